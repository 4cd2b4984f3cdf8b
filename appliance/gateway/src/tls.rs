//! TLS for the listeners: the site's own certificate, or a self-signed one generated on
//! first start for this host's names and addresses (ECDSA P-256), stored as
//! `tls/cert.pem` and `tls/key.pem` (0600) so clients can trust it with `--cacert`.
//! When the host later gains a name or address the certificate does not cover, the
//! daemon warns (clients trust this certificate; replacing it silently would break them). rustls with the ring provider: TLS 1.2 and 1.3, AEAD suites with
//! forward secrecy only (Mozilla "intermediate"), ALPN h2 and http/1.1.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("generating the self-signed certificate: {0}")]
    Generate(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Where the certificate chain and key are.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Whether the appliance generated them (self-signed).
    pub generated: bool,
}

/// The SHA-256 fingerprint (hex) of the first certificate in a PEM file's text.
pub fn fingerprint(pem: &[u8]) -> Option<String> {
    let der: rustls::pki_types::CertificateDer<'static> =
        rustls::pki_types::pem::PemObject::from_pem_slice(pem).ok()?;
    Some(crate::keys::hex(
        ring::digest::digest(&ring::digest::SHA256, &der).as_ref(),
    ))
}

/// The names and addresses this host answers to: its hostname, localhost and every
/// interface address.
pub fn host_names() -> BTreeSet<String> {
    let mut names: BTreeSet<String> = ["localhost", "127.0.0.1", "::1"]
        .into_iter()
        .map(String::from)
        .collect();
    if let Ok(h) = nix::unistd::gethostname() {
        if let Some(h) = h.to_str().filter(|h| !h.is_empty()) {
            names.insert(h.to_string());
        }
    }
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            // Container and VM bridges come and go; they are not how the LAN reaches us.
            let virtual_if = [
                "docker", "veth", "br-", "virbr", "cni", "flannel", "cali", "vnet",
            ]
            .iter()
            .any(|p| a.interface_name.starts_with(p));
            if virtual_if {
                continue;
            }
            let Some(addr) = a.address else { continue };
            if let Some(v4) = addr.as_sockaddr_in() {
                names.insert(v4.ip().to_string());
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                let ip = v6.ip();
                // Link-local addresses need a zone to be used; they cannot be in a SAN usefully.
                if (ip.segments()[0] & 0xffc0) != 0xfe80 {
                    names.insert(ip.to_string());
                }
            }
        }
    }
    names
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Uses `tls/cert.pem` + `tls/key.pem` under `dir`, generating them (self-signed, for
/// `names`) when missing. A generated certificate that misses a name is kept, with a
/// warning saying how to replace it.
pub fn ensure_self_signed(dir: &Path, names: &BTreeSet<String>) -> Result<TlsFiles, TlsError> {
    let tls = dir.join("tls");
    let cert = tls.join("cert.pem");
    let key = tls.join("key.pem");
    let names_file = tls.join("generated-for.txt");
    if cert.exists() && key.exists() {
        match std::fs::read_to_string(&names_file) {
            // Not ours (placed by the site): use as is.
            Err(_) => {
                return Ok(TlsFiles {
                    cert,
                    key,
                    generated: false,
                })
            }
            Ok(list) => {
                let covered: BTreeSet<String> = list.lines().map(str::to_string).collect();
                let missing: Vec<String> = names.difference(&covered).cloned().collect();
                if !missing.is_empty() {
                    // Not regenerated behind the clients' backs: they trust this one.
                    log::warn!(
                        "tls: the self-signed certificate does not cover {} (new names or addresses of this host); \
                         clients using them will fail verification. To issue a new one, remove {} and {} and restart \
                         (clients must then trust the new certificate), or configure the site's own certificate",
                        missing.join(", "),
                        cert.display(),
                        key.display()
                    );
                }
                return Ok(TlsFiles {
                    cert,
                    key,
                    generated: true,
                });
            }
        }
    }
    std::fs::create_dir_all(&tls).map_err(io(&tls))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tls, std::fs::Permissions::from_mode(0o700)).map_err(io(&tls))?;
    }
    let (cert_pem, key_pem) = generate(names)?;
    // Each file whole or not at all, and on disk before the daemon goes on: a power cut
    // right after the first start must not leave a truncated certificate behind.
    write_durable(&key, key_pem.as_bytes(), 0o600)?;
    write_durable(&cert, cert_pem.as_bytes(), 0o644)?;
    let list: String = names.iter().map(|n| format!("{n}\n")).collect();
    write_durable(&names_file, list.as_bytes(), 0o644)?;
    std::fs::File::open(&tls)
        .and_then(|d| d.sync_all())
        .map_err(io(&tls))?;
    log::info!(
        "tls: generated a self-signed certificate for {} at {}",
        names.iter().cloned().collect::<Vec<_>>().join(", "),
        cert.display()
    );
    Ok(TlsFiles {
        cert,
        key,
        generated: true,
    })
}

/// Writes a file with `mode`, atomically and synced (temp file, fsync, rename).
fn write_durable(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn generate(names: &BTreeSet<String>) -> Result<(String, String), TlsError> {
    let e = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let mut params =
        rcgen::CertificateParams::new(names.iter().cloned().collect::<Vec<_>>()).map_err(e)?;
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "appliance".into());
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("appliance {host}"));
    params.distinguished_name.push(
        rcgen::DnType::OrganizationName,
        "Sovereign AI appliance (self-signed)",
    );
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let key = rcgen::KeyPair::generate().map_err(e)?;
    let cert = params.self_signed(&key).map_err(e)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The certificate the listeners present, replaceable while they run (the console's
/// certificate page): every handshake after a replacement gets the new one.
#[derive(Debug)]
pub struct LiveCert {
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl LiveCert {
    pub fn replace(&self, key: Arc<rustls::sign::CertifiedKey>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = key;
    }
}

impl rustls::server::ResolvesServerCert for LiveCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// A certificate chain and its private key from PEM text, checked to belong together.
/// `what` names the source in errors.
pub fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    what: &str,
) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what}: the certificate: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what}: no certificate in the PEM text"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("{what}: the private key: {e}"))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{what}: the private key: {e}"))?;
    let ck = rustls::sign::CertifiedKey::new(certs, signing);
    ck.keys_match()
        .map_err(|e| format!("{what}: the key does not belong to the certificate ({e})"))?;
    Ok(Arc::new(ck))
}

/// A rustls server configuration from PEM files, and the handle that replaces its
/// certificate.
pub fn server_config(
    files: &TlsFiles,
) -> Result<(Arc<rustls::ServerConfig>, Arc<LiveCert>), TlsError> {
    let read = |path: &Path| std::fs::read(path).map_err(io(path));
    let cert = read(&files.cert)?;
    let certs: Result<Vec<CertificateDer<'static>>, _> =
        CertificateDer::pem_slice_iter(&cert).collect();
    match certs {
        Ok(c) if !c.is_empty() => {}
        Ok(_) => {
            return Err(TlsError::Pem {
                path: files.cert.clone(),
                message: "no certificate in the file".into(),
            })
        }
        Err(e) => {
            return Err(TlsError::Pem {
                path: files.cert.clone(),
                message: e.to_string(),
            })
        }
    }
    let key = read(&files.key)?;
    let what = format!("{} / {}", files.cert.display(), files.key.display());
    let ck = certified_key(&cert, &key, &what).map_err(|message| TlsError::Pem {
        path: files.cert.clone(),
        message,
    })?;
    let live = Arc::new(LiveCert {
        current: std::sync::RwLock::new(ck),
    });
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(live.clone());
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((Arc::new(cfg), live))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_and_keeps_it() {
        let d = std::env::temp_dir().join(format!("appliance-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let mut names = host_names();
        assert!(names.contains("localhost") && names.contains("127.0.0.1"));
        let a = ensure_self_signed(&d, &names).unwrap();
        assert!(a.generated);
        let mode = {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(&a.key).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(mode, 0o600);
        let first = std::fs::read(&a.cert).unwrap();
        server_config(&a).unwrap();
        // Same names: kept.
        ensure_self_signed(&d, &names).unwrap();
        assert_eq!(std::fs::read(&a.cert).unwrap(), first);
        // A new address: kept (with a warning), since clients trust this certificate.
        names.insert("10.99.0.1".into());
        let again = ensure_self_signed(&d, &names).unwrap();
        assert!(again.generated);
        assert_eq!(std::fs::read(&a.cert).unwrap(), first);
        // A site's own files (no generated-for list) are used as they are.
        std::fs::remove_file(d.join("tls/generated-for.txt")).unwrap();
        names.insert("10.99.0.2".into());
        let own = ensure_self_signed(&d, &names).unwrap();
        assert!(!own.generated);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn bad_pem_names_the_file() {
        let d = std::env::temp_dir().join(format!("appliance-tls-bad-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let files = TlsFiles {
            cert: d.join("c.pem"),
            key: d.join("k.pem"),
            generated: false,
        };
        std::fs::write(&files.cert, "not a pem").unwrap();
        let e = server_config(&files).unwrap_err().to_string();
        assert!(e.contains("c.pem"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
