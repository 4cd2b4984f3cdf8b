//! The model registry's files: bundles, manifests, Ed25519 signatures, the site's trust
//! policy, and the content-addressed store under the data directory.
//!
//! A **bundle** is a folder or a tar archive holding one GGUF file, `manifest.toml`
//! (name, file, SHA-256, size, license, provenance) and, if signed, `manifest.sig` (the
//! signer's public key and an Ed25519 signature over the exact bytes of `manifest.toml`).
//! A bare GGUF file is an unsigned import with no manifest.
//!
//! Import copies the GGUF into `models/.incoming/` while hashing it, checks size, hash,
//! signature and trust, reads the GGUF header, and only then renames it into
//! `models/sha256/<hex>.gguf`. Any failure removes what was copied: nothing
//! half-imported is left. This crate knows nothing of SQL (the caller records the
//! result) or HTTP.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    // The cause in the message, not as `source`: callers print the chain, which
    // would repeat it.
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("{path}: the SHA-256 is {actual}, the manifest says {expected}: the file was altered or damaged; refusing it")]
    HashMismatch {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("{path}: {actual} bytes, the manifest says {expected}: the file is truncated or altered; refusing it")]
    SizeMismatch {
        path: String,
        expected: u64,
        actual: u64,
    },
    #[error("{path}: the signature does not verify against the manifest: the manifest or the signature was altered; refusing it")]
    BadSignature { path: String },
    #[error("{path}: signed by key {key}, which is not in the site's trusted signers ({policy}); refusing it")]
    UntrustedSigner {
        path: String,
        key: String,
        policy: String,
    },
    #[error("{path}: the model is not signed and this site requires signatures (require_signature in {policy}); refusing it")]
    Unsigned { path: String, policy: String },
    #[error("{path}: not a model the appliance can serve: {reason}")]
    BadGguf { path: String, reason: String },
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |err| RegistryError::Io {
        path: path.display().to_string(),
        err,
    }
}

fn invalid(path: &Path, message: impl Into<String>) -> RegistryError {
    RegistryError::Invalid {
        path: path.display().to_string(),
        message: message.into(),
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Parses TOML, with line and column in the message.
fn parse_toml<T: for<'de> Deserialize<'de>>(path: &Path, text: &str) -> Result<T> {
    toml::from_str(text).map_err(|e: toml::de::Error| {
        let (line, col) = e
            .span()
            .map(|s| {
                let before = &text[..s.start.min(text.len())];
                (
                    before.matches('\n').count() + 1,
                    before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1,
                )
            })
            .unwrap_or((0, 0));
        invalid(path, format!("line {line}, column {col}: {}", e.message()))
    })
}

/// `manifest.toml` of a bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The name clients will use (`model` in API requests).
    pub name: String,
    /// The GGUF file in the bundle.
    pub file: String,
    pub sha256: String,
    pub size: u64,
    #[serde(default)]
    pub license: Option<String>,
    #[serde(default)]
    pub provenance: BTreeMap<String, String>,
}

/// `manifest.sig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureFile {
    /// `ed25519:<64 hex>`: the signer's public key.
    pub key: String,
    /// 128 hex digits: Ed25519 over the bytes of manifest.toml.
    pub signature: String,
}

/// The site's trust policy: `trusted-signers.toml` in its policy directory.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustPolicy {
    /// Refuse unsigned models (the production profile). Default: accept with a warning.
    #[serde(default)]
    pub require_signature: bool,
    #[serde(default, rename = "signer")]
    pub signers: Vec<Signer>,
    #[serde(skip)]
    pub source: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signer {
    pub name: String,
    /// `ed25519:<64 hex>`.
    pub public_key: String,
}

impl TrustPolicy {
    /// Reads the policy file; a missing file is the default (no signers, unsigned
    /// accepted with a warning) unless `production` (then unsigned is refused).
    pub fn load(path: &Path, production: bool) -> Result<TrustPolicy> {
        let mut p = match std::fs::read_to_string(path) {
            Ok(text) => {
                let p: TrustPolicy = parse_toml(path, &text)?;
                for s in &p.signers {
                    parse_public_key(&s.public_key).ok_or_else(|| {
                        invalid(
                            path,
                            format!(
                                "signer {:?}: public_key must be ed25519:<64 hex digits>",
                                s.name
                            ),
                        )
                    })?;
                }
                p
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => TrustPolicy::default(),
            Err(e) => return Err(io(path)(e)),
        };
        p.require_signature |= production;
        p.source = path.display().to_string();
        Ok(p)
    }

    fn signer(&self, key: &[u8]) -> Option<&Signer> {
        self.signers
            .iter()
            .find(|s| parse_public_key(&s.public_key).as_deref() == Some(key))
    }
}

pub fn parse_public_key(s: &str) -> Option<Vec<u8>> {
    let k = unhex(s.trim().strip_prefix("ed25519:")?)?;
    (k.len() == 32).then_some(k)
}

/// A signing key, stored as its PKCS#8 document in hex (file mode 0600).
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl SigningKey {
    /// Generates a key and writes it to `path` (which must not exist).
    pub fn generate(path: &Path) -> Result<SigningKey> {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| invalid(path, "the system's random generator failed"))?;
        let text = format!(
            "# Appliance model-signing key (Ed25519, PKCS#8, hex). Keep it secret.\n{}\n",
            hex(doc.as_ref())
        );
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io(path))?;
        f.write_all(text.as_bytes()).map_err(io(path))?;
        let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref())
            .map_err(|_| invalid(path, "generated key did not load"))?;
        Ok(SigningKey { pair })
    }

    pub fn load(path: &Path) -> Result<SigningKey> {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        let line = text
            .lines()
            .find(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .ok_or_else(|| invalid(path, "no key in the file"))?;
        let der = unhex(line).ok_or_else(|| invalid(path, "the key is not hex"))?;
        let pair = Ed25519KeyPair::from_pkcs8(&der)
            .map_err(|_| invalid(path, "not an Ed25519 PKCS#8 key"))?;
        Ok(SigningKey { pair })
    }

    /// `ed25519:<hex>`, for the site's trusted-signers file.
    pub fn public_key(&self) -> String {
        format!("ed25519:{}", hex(self.pair.public_key().as_ref()))
    }

    pub fn sign(&self, message: &[u8]) -> SignatureFile {
        SignatureFile {
            key: self.public_key(),
            signature: hex(self.pair.sign(message).as_ref()),
        }
    }
}

/// What the GGUF header says about a model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GgufFacts {
    pub architecture: String,
    pub parameters: u64,
    pub quantization: String,
    pub context_length: u64,
    pub chat_template: bool,
}

pub fn gguf_facts(path: &Path) -> Result<GgufFacts> {
    let f = appliance_engine::gguf::GgufFile::open(path).map_err(|e| RegistryError::BadGguf {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(GgufFacts {
        architecture: f.config.architecture_name.clone(),
        parameters: f.parameter_count(),
        quantization: f.quantization(),
        context_length: f.config.context_length as u64,
        chat_template: f.metadata().contains_key("tokenizer.chat_template"),
    })
}

/// A model that passed every check and sits in the store.
#[derive(Debug, Clone, Serialize)]
pub struct Imported {
    pub name: String,
    pub sha256: String,
    pub size: u64,
    /// Where the store keeps it.
    pub path: PathBuf,
    pub facts: GgufFacts,
    pub license: Option<String>,
    pub provenance: BTreeMap<String, String>,
    /// The trusted signer's name, if signed.
    pub signed_by: Option<String>,
    /// A warning to show (unsigned accepted).
    pub warning: Option<String>,
}

/// Removes a path (file or folder) when dropped, unless disarmed.
struct Cleanup(Option<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

/// Reads `src` to its end, writing it to `out` (if any) and hashing it; calls
/// `progress(done, total)` as it goes. Returns (SHA-256 hex, bytes).
fn hash_through(
    src: &Path,
    mut out: Option<(&Path, File)>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(String, u64)> {
    let mut input = File::open(src).map_err(io(src))?;
    let total = input.metadata().map_err(io(src))?.len();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = input.read(&mut buf).map_err(io(src))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        if let Some((path, f)) = out.as_mut() {
            f.write_all(&buf[..n]).map_err(io(path))?;
        }
        done += n as u64;
        progress(done, total);
    }
    if let Some((path, f)) = out {
        f.sync_all().map_err(io(path))?;
    }
    Ok((hex(ctx.finish().as_ref()), done))
}

/// Copies `src` to `dst` while hashing.
fn copy_hashing(
    src: &Path,
    dst: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(String, u64)> {
    let out = File::create(dst).map_err(io(dst))?;
    hash_through(src, Some((dst, out)), progress)
}

/// SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<(String, u64)> {
    hash_through(path, None, &mut |_, _| {})
}

/// A safe plain file name (no path separators, not hidden, not `..`).
fn plain_name(s: &str) -> bool {
    !s.is_empty() && !s.contains('/') && !s.contains('\\') && !s.starts_with('.') && s.len() <= 255
}

/// Unpacks a tar bundle's regular files into `dir` (flat; anything else is refused).
fn unpack_tar(tar_path: &Path, dir: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
    let total = std::fs::metadata(tar_path).map_err(io(tar_path))?.len();
    let f = File::open(tar_path).map_err(io(tar_path))?;
    let mut archive = tar::Archive::new(f);
    let mut done = 0u64;
    for entry in archive.entries().map_err(io(tar_path))? {
        let mut entry = entry.map_err(io(tar_path))?;
        let path = entry.path().map_err(io(tar_path))?.into_owned();
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            continue;
        }
        // Accept `x` and `./x` and `folder/x` (one level), regular files only.
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .unwrap_or_default();
        if !kind.is_file() || !plain_name(&name) || path.components().count() > 2 {
            return Err(invalid(
                tar_path,
                format!(
                    "the archive holds {:?}, which is not a plain file of a bundle",
                    path
                ),
            ));
        }
        let dst = dir.join(&name);
        if dst.exists() {
            return Err(invalid(tar_path, format!("the archive holds {name} twice")));
        }
        let mut out = File::create(&dst).map_err(io(&dst))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = entry.read(&mut buf).map_err(io(tar_path))?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).map_err(io(&dst))?;
            done += n as u64;
            progress(done, total);
        }
    }
    Ok(())
}

/// The store's layout under the data directory.
#[derive(Debug, Clone)]
pub struct Store {
    pub root: PathBuf,
}

impl Store {
    pub fn new(data_dir: &Path) -> Store {
        Store {
            root: data_dir.join("models"),
        }
    }

    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.root.join("sha256").join(format!("{sha256}.gguf"))
    }

    fn incoming(&self) -> Result<PathBuf> {
        let dir = self.root.join(".incoming").join(hex(&random::<8>()));
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        std::fs::create_dir_all(self.root.join("sha256")).map_err(io(&self.root))?;
        Ok(dir)
    }

    /// Imports a GGUF file or a bundle (folder or tar). `name` overrides the manifest's
    /// (or, for a bare file, the file stem).
    pub fn import(
        &self,
        source: &Path,
        name: Option<&str>,
        trust: &TrustPolicy,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Imported> {
        let meta = std::fs::metadata(source).map_err(io(source))?;
        let work = self.incoming()?;
        let _cleanup = Cleanup(Some(work.clone()));
        // Where the bundle's files are: the folder itself, or the unpacked tar.
        let bundle_dir: Option<PathBuf> = if meta.is_dir() {
            Some(source.to_path_buf())
        } else {
            let mut magic = [0u8; 4];
            File::open(source)
                .and_then(|mut f| f.read_exact(&mut magic))
                .map_err(io(source))?;
            if &magic == b"GGUF" {
                None
            } else {
                let unpacked = work.join("bundle");
                std::fs::create_dir_all(&unpacked).map_err(io(&unpacked))?;
                unpack_tar(source, &unpacked, progress).map_err(|e| match e {
                    RegistryError::Io { .. } => {
                        invalid(source, "neither a GGUF file nor a readable tar bundle")
                    }
                    e => e,
                })?;
                Some(unpacked)
            }
        };
        let tmp = work.join("model.gguf");
        let (manifest, signed_by, warning, gguf_src) = match &bundle_dir {
            None => {
                if trust.require_signature {
                    return Err(RegistryError::Unsigned {
                        path: source.display().to_string(),
                        policy: trust.source.clone(),
                    });
                }
                (
                    None,
                    None,
                    Some(format!(
                        "{} is not signed; imported because the site accepts unsigned models",
                        source.display()
                    )),
                    source.to_path_buf(),
                )
            }
            Some(dir) => {
                let mpath = dir.join("manifest.toml");
                let mbytes = std::fs::read(&mpath)
                    .map_err(|_| invalid(source, "the bundle has no manifest.toml"))?;
                let mtext =
                    String::from_utf8(mbytes.clone()).map_err(|_| invalid(&mpath, "not UTF-8"))?;
                let m: Manifest = parse_toml(&mpath, &mtext)?;
                if !plain_name(&m.file) {
                    return Err(invalid(
                        &mpath,
                        format!("file {:?} must be a plain file name in the bundle", m.file),
                    ));
                }
                if unhex(&m.sha256).is_none_or(|h| h.len() != 32) {
                    return Err(invalid(&mpath, "sha256 must be 64 hex digits"));
                }
                let spath = dir.join("manifest.sig");
                let (signed_by, warning) = match std::fs::read_to_string(&spath) {
                    Ok(stext) => {
                        let sig: SignatureFile = parse_toml(&spath, &stext)?;
                        let key = parse_public_key(&sig.key).ok_or_else(|| {
                            invalid(&spath, "key must be ed25519:<64 hex digits>")
                        })?;
                        let signature =
                            unhex(&sig.signature).ok_or_else(|| RegistryError::BadSignature {
                                path: spath.display().to_string(),
                            })?;
                        UnparsedPublicKey::new(&ED25519, &key)
                            .verify(&mbytes, &signature)
                            .map_err(|_| RegistryError::BadSignature {
                                path: spath.display().to_string(),
                            })?;
                        let signer =
                            trust
                                .signer(&key)
                                .ok_or_else(|| RegistryError::UntrustedSigner {
                                    path: spath.display().to_string(),
                                    key: sig.key.clone(),
                                    policy: trust.source.clone(),
                                })?;
                        (Some(signer.name.clone()), None)
                    }
                    Err(_) if trust.require_signature => {
                        return Err(RegistryError::Unsigned {
                            path: source.display().to_string(),
                            policy: trust.source.clone(),
                        })
                    }
                    Err(_) => (
                        None,
                        Some(format!(
                            "{} is not signed; imported because the site accepts unsigned models",
                            source.display()
                        )),
                    ),
                };
                let gguf = dir.join(&m.file);
                (Some(m), signed_by, warning, gguf)
            }
        };
        // The GGUF: copied (or, from an unpacked tar, moved) and hashed.
        let (sha256, size) = if bundle_dir.as_deref().is_some_and(|d| d.starts_with(&work)) {
            std::fs::rename(&gguf_src, &tmp).map_err(|_| {
                invalid(source, "the bundle lacks the GGUF file its manifest names")
            })?;
            sha256_file(&tmp)?
        } else {
            if !gguf_src.is_file() {
                return Err(invalid(
                    source,
                    "the bundle lacks the GGUF file its manifest names",
                ));
            }
            copy_hashing(&gguf_src, &tmp, progress)?
        };
        if let Some(m) = &manifest {
            if size != m.size {
                return Err(RegistryError::SizeMismatch {
                    path: gguf_src.display().to_string(),
                    expected: m.size,
                    actual: size,
                });
            }
            if sha256 != m.sha256.to_ascii_lowercase() {
                return Err(RegistryError::HashMismatch {
                    path: gguf_src.display().to_string(),
                    expected: m.sha256.clone(),
                    actual: sha256,
                });
            }
        }
        let facts = gguf_facts(&tmp)?;
        let name = match (name, &manifest) {
            (Some(n), _) => n.to_string(),
            (None, Some(m)) => m.name.clone(),
            (None, None) => source
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("model")
                .to_string(),
        };
        let final_path = self.path_of(&sha256);
        std::fs::rename(&tmp, &final_path).map_err(io(&final_path))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&final_path, std::fs::Permissions::from_mode(0o440));
        }
        Ok(Imported {
            name,
            sha256,
            size,
            path: final_path,
            facts,
            license: manifest.as_ref().and_then(|m| m.license.clone()),
            provenance: manifest.map(|m| m.provenance).unwrap_or_default(),
            signed_by,
            warning,
        })
    }
}

fn random<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut b = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("the operating system's random number generator failed");
    b
}

/// Writes a signed bundle folder: the GGUF (copied), `manifest.toml`, `manifest.sig`.
pub fn make_bundle(
    gguf: &Path,
    out_dir: &Path,
    name: &str,
    license: Option<String>,
    provenance: BTreeMap<String, String>,
    key: &SigningKey,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Manifest> {
    gguf_facts(gguf)?;
    if out_dir.exists() {
        return Err(invalid(
            out_dir,
            "already exists; choose a new folder for the bundle",
        ));
    }
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let file = gguf
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| plain_name(n))
        .unwrap_or("model.gguf")
        .to_string();
    let (sha256, size) = copy_hashing(gguf, &out_dir.join(&file), progress)?;
    let manifest = Manifest {
        name: name.to_string(),
        file,
        sha256,
        size,
        license,
        provenance,
    };
    let text = toml::to_string(&manifest).map_err(|e| invalid(out_dir, e.to_string()))?;
    let mpath = out_dir.join("manifest.toml");
    std::fs::write(&mpath, &text).map_err(io(&mpath))?;
    let sig =
        toml::to_string(&key.sign(text.as_bytes())).map_err(|e| invalid(out_dir, e.to_string()))?;
    let spath = out_dir.join("manifest.sig");
    std::fs::write(&spath, sig).map_err(io(&spath))?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_keys_parse() {
        assert_eq!(unhex(&hex(&[0, 1, 254, 255])), Some(vec![0, 1, 254, 255]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        assert!(parse_public_key(&format!("ed25519:{}", "ab".repeat(32))).is_some());
        assert!(parse_public_key(&"ab".repeat(32)).is_none());
        assert!(parse_public_key(&format!("ed25519:{}", "ab".repeat(31))).is_none());
    }

    #[test]
    fn signatures_verify_only_the_signed_bytes() {
        let d = std::env::temp_dir().join(format!("appliance-registry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let k = SigningKey::generate(&d.join("k")).unwrap();
        assert!(
            SigningKey::generate(&d.join("k")).is_err(),
            "an existing key was overwritten"
        );
        let again = SigningKey::load(&d.join("k")).unwrap();
        assert_eq!(again.public_key(), k.public_key());
        let sig = k.sign(b"name = \"m\"\n");
        let pk = parse_public_key(&sig.key).unwrap();
        let s = unhex(&sig.signature).unwrap();
        let v = UnparsedPublicKey::new(&ED25519, &pk);
        assert!(v.verify(b"name = \"m\"\n", &s).is_ok());
        assert!(v.verify(b"name = \"n\"\n", &s).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn trust_policy_defaults_and_errors() {
        let d = std::env::temp_dir().join(format!("appliance-trust-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let missing = TrustPolicy::load(&d.join("none.toml"), false).unwrap();
        assert!(!missing.require_signature && missing.signers.is_empty());
        assert!(
            TrustPolicy::load(&d.join("none.toml"), true)
                .unwrap()
                .require_signature
        );
        let p = d.join("t.toml");
        std::fs::write(
            &p,
            "require_signature = true\n[[signer]]\nname = \"a\"\npublic_key = \"ed25519:00\"\n",
        )
        .unwrap();
        let e = TrustPolicy::load(&p, false).unwrap_err().to_string();
        assert!(e.contains("t.toml") && e.contains("signer \"a\""), "{e}");
        std::fs::write(&p, "require_signatures = true\n").unwrap();
        let e = TrustPolicy::load(&p, false).unwrap_err().to_string();
        assert!(e.contains("line 1, column 1"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
