//! `POST /models/upload?file=NAME[&name=MODEL]`: a model file sent from the browser
//! (the raw bytes, `application/octet-stream`, with the session's CSRF token in
//! `X-CSRF-Token`), streamed to the data directory with progress, then imported like a
//! file on the appliance (signature and trust checks, content-addressed store). The
//! uploaded copy is deleted afterwards, whatever the outcome. Answers JSON.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::io::AsyncWriteExt;

use crate::{lock, same, Console, Import, Progress, Resp, Role};

/// How long the stream may pause before the upload is given up.
const STALL: Duration = Duration::from_secs(60);
/// Space left free on the data file system after an upload and its import (which
/// copies it into the model store).
const RESERVE: u64 = 1 << 30;

fn answer(status: StatusCode, ok: bool, message: &str) -> Resp {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(
            serde_json::json!({"ok": ok, "message": message}).to_string(),
        )))
        .unwrap_or_default()
}

/// A file name from the browser: its last component, letters, digits, `._-` only,
/// ending in `.gguf` or `.tar` (a signed bundle).
pub(crate) fn upload_name(raw: &str) -> Option<String> {
    let base = raw.rsplit(['/', '\\']).next()?;
    let ok = !base.is_empty()
        && base.len() <= 128
        && !base.starts_with('.')
        && base
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && (base.ends_with(".gguf") || base.ends_with(".tar"));
    ok.then(|| base.to_string())
}

/// Bytes free for the appliance's user on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(s.blocks_available() as u64 * s.fragment_size() as u64)
}

impl Console {
    /// The checks of a raw-bytes POST from the page: a session, one of `roles`, the
    /// session's CSRF token in `X-CSRF-Token`, an octet-stream body. The user, or the
    /// answer (refusals recorded against `resource`).
    async fn raw_post(
        &self,
        parts: &http::request::Parts,
        peer: SocketAddr,
        roles: &[Role],
        resource: &str,
        denied: &str,
    ) -> Result<String, Resp> {
        let cookies = crate::cookies_of(&parts.headers);
        let id = cookies.get(crate::SESSION).cloned().unwrap_or_default();
        let Some((user, role, csrf)) = self.session(&id, false) else {
            return Err(answer(
                StatusCode::UNAUTHORIZED,
                false,
                "Your session has ended; log in again.",
            ));
        };
        if !roles.contains(&role) {
            return Err(self
                .refuse(&user, peer, "console.denied", resource, denied)
                .await);
        }
        let token = parts
            .headers
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !same(token, &csrf) {
            return Err(self
                .refuse(
                    &user,
                    peer,
                    "console.csrf",
                    resource,
                    "The upload's security token is missing or wrong; reload the page and try again.",
                )
                .await);
        }
        let octets = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/octet-stream"));
        if !octets {
            return Err(answer(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                false,
                "Send the file's bytes as application/octet-stream.",
            ));
        }
        Ok(user)
    }

    /// `POST /system/restore`: a backup file's bytes (admin only) with its passphrase in
    /// `X-Backup-Passphrase`; decrypted and verified, staged, then the daemon restarts
    /// to apply it (docs/CONSOLE.md). Answers JSON.
    pub(crate) async fn restore(
        self: &Arc<Self>,
        parts: http::request::Parts,
        body: &mut Incoming,
        peer: SocketAddr,
    ) -> Resp {
        const RESOURCE: &str = "/system/restore";
        let user = match self
            .raw_post(
                &parts,
                peer,
                &[Role::Admin],
                RESOURCE,
                "Only an admin may restore.",
            )
            .await
        {
            Ok(u) => u,
            Err(r) => return r,
        };
        // Percent-encoded by the page (a header carries ASCII only).
        let passphrase = parts
            .headers
            .get("x-backup-passphrase")
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                crate::parse_form(&format!("p={v}"))
                    .remove("p")
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        let Some(len) = content_length(&parts).filter(|&n| n <= MAX_BACKUP) else {
            return answer(
                StatusCode::PAYLOAD_TOO_LARGE,
                false,
                "A backup must say its length and be at most 1 GiB.",
            );
        };
        if passphrase.is_empty() {
            return answer(
                StatusCode::BAD_REQUEST,
                false,
                "Give the backup's passphrase.",
            );
        }
        let bytes = match receive_bytes(body, len).await {
            Ok(b) => b,
            Err(e) => {
                return answer(
                    StatusCode::BAD_REQUEST,
                    false,
                    &format!("The upload failed: {e}"),
                )
            }
        };
        let resource = Some(RESOURCE.to_string());
        if let Err(e) = self
            .record(
                Some(&user),
                peer,
                "backup.stage",
                200,
                resource.clone(),
                Some(format!("{len} bytes")),
            )
            .await
        {
            return answer(StatusCode::SERVICE_UNAVAILABLE, false, &e);
        }
        match self.ops.stage_restore(bytes, passphrase).await {
            Ok(summary) => {
                let ops = self.ops.clone();
                // Answer first, then stop: the daemon restarts and applies it.
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    ops.restart();
                });
                answer(
                    StatusCode::OK,
                    true,
                    &format!("Staged: {summary}. The appliance restarts now to restore it; log in again in a minute."),
                )
            }
            Err(e) => {
                let _ = self
                    .record(
                        Some(&user),
                        peer,
                        "backup.stage",
                        400,
                        resource,
                        Some(e.clone()),
                    )
                    .await;
                answer(StatusCode::BAD_REQUEST, false, &e)
            }
        }
    }

    pub(crate) async fn upload(
        self: &Arc<Self>,
        parts: http::request::Parts,
        body: &mut Incoming,
        peer: SocketAddr,
    ) -> Resp {
        let user = match self
            .raw_post(
                &parts,
                peer,
                &[Role::Admin, Role::Operator],
                "/models/upload",
                "Your role may not import models.",
            )
            .await
        {
            Ok(u) => u,
            Err(r) => return r,
        };
        let query = crate::parse_form(parts.uri.query().unwrap_or(""));
        let Some(file) = query.get("file").and_then(|f| upload_name(f)) else {
            return answer(
                StatusCode::BAD_REQUEST,
                false,
                "The file must be a .gguf model or a .tar signed bundle (letters, digits, '.', '_', '-' in its name).",
            );
        };
        let name = query
            .get("name")
            .map(|n| n.trim().to_string())
            .unwrap_or_default();
        if !name.is_empty() && !crate::pages::valid_name(&name) {
            return answer(
                StatusCode::BAD_REQUEST,
                false,
                "A model name is 1 to 64 letters, digits, '.', '_', ':' or '-'.",
            );
        }
        let Some(len) = content_length(&parts) else {
            return answer(
                StatusCode::LENGTH_REQUIRED,
                false,
                "The upload must say its length.",
            );
        };
        let dir = self.data_dir.join("uploads");
        if let Err(e) = std::fs::create_dir_all(&dir) {
            return answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                false,
                &format!("{}: {e}", dir.display()),
            );
        }
        let free = free_bytes(&dir).unwrap_or(0);
        // The upload, then its copy in the model store, and a reserve.
        if len.saturating_mul(2).saturating_add(RESERVE) > free {
            return answer(
                StatusCode::INSUFFICIENT_STORAGE,
                false,
                &format!(
                    "Not enough space: {file} needs {:.1} GiB twice (upload and model store) plus 1 GiB; {:.1} GiB free.",
                    len as f64 / (1u64 << 30) as f64,
                    free as f64 / (1u64 << 30) as f64
                ),
            );
        }
        let progress = Arc::new(Progress::default());
        progress.total.store(len, Ordering::Relaxed);
        {
            let mut slot = lock(&self.import);
            if slot.as_ref().is_some_and(|i| i.result.is_none()) {
                return answer(
                    StatusCode::CONFLICT,
                    false,
                    "An import is already running; wait for it to finish.",
                );
            }
            *slot = Some(Import {
                source: format!("upload {file}"),
                by: user.clone(),
                progress: progress.clone(),
                result: None,
            });
        }
        let fail = |message: String| {
            if let Some(i) = lock(&self.import).as_mut() {
                i.result = Some(Err(message.clone()));
            }
            message
        };
        if let Err(e) = self
            .record(
                Some(&user),
                peer,
                "model.upload",
                200,
                Some(format!("upload:{file}")),
                Some(format!("{len} bytes")),
            )
            .await
        {
            return answer(StatusCode::SERVICE_UNAVAILABLE, false, &fail(e));
        }
        let partial = dir.join(format!(
            ".{}-{file}.partial",
            appliance_gateway::keys::random_hex::<8>()
        ));
        let result = receive(body, &partial, len, &progress).await;
        let path = match result {
            Ok(()) => {
                let path = partial.with_file_name(
                    partial
                        .file_name()
                        .map(|n| {
                            n.to_string_lossy()
                                .trim_start_matches('.')
                                .trim_end_matches(".partial")
                                .to_string()
                        })
                        .unwrap_or_default(),
                );
                match std::fs::rename(&partial, &path) {
                    Ok(()) => path,
                    Err(e) => {
                        let _ = std::fs::remove_file(&partial);
                        return self
                            .upload_failed(
                                &user,
                                peer,
                                &file,
                                fail(format!("keeping the upload: {e}")),
                            )
                            .await;
                    }
                }
            }
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return self.upload_failed(&user, peer, &file, fail(e)).await;
            }
        };
        // The bytes are here: the import goes on in the background, with the same
        // progress bar (now counting the import's bytes).
        progress.done.store(0, Ordering::Relaxed);
        crate::pages::spawn_import(
            self,
            path,
            (!name.is_empty()).then_some(name),
            progress,
            user,
            peer,
            true,
        );
        answer(
            StatusCode::OK,
            true,
            &format!("{file} uploaded; importing."),
        )
    }

    /// A 403, recorded under `action` against `resource`.
    async fn refuse(
        &self,
        user: &str,
        peer: SocketAddr,
        action: &str,
        resource: &str,
        message: &str,
    ) -> Resp {
        let _ = self
            .record(Some(user), peer, action, 403, Some(resource.into()), None)
            .await;
        answer(StatusCode::FORBIDDEN, false, message)
    }

    async fn upload_failed(
        &self,
        user: &str,
        peer: SocketAddr,
        file: &str,
        message: String,
    ) -> Resp {
        let _ = self
            .record(
                Some(user),
                peer,
                "model.upload",
                400,
                Some(format!("upload:{file}")),
                Some(message.clone()),
            )
            .await;
        answer(
            StatusCode::BAD_REQUEST,
            false,
            &format!("The upload failed: {message}"),
        )
    }
}

/// The largest backup the page takes (backups are built and checked in memory).
const MAX_BACKUP: u64 = 1 << 30;

fn content_length(parts: &http::request::Parts) -> Option<u64> {
    parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&n| n > 0)
}

/// The body's next data bytes (`None` at its end); a stall of [`STALL`] or a broken
/// connection is an error.
async fn next_chunk(body: &mut Incoming) -> Result<Option<Bytes>, String> {
    loop {
        let frame = match tokio::time::timeout(STALL, body.frame()).await {
            Err(_) => return Err(format!("nothing arrived for {} s", STALL.as_secs())),
            Ok(None) => return Ok(None),
            Ok(Some(Err(e))) => return Err(format!("the connection broke off ({e})")),
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            return Ok(Some(data));
        }
    }
}

/// Reads and drops what is left of a body that was refused, up to 16 MiB (a stall of
/// [`STALL`] or a broken connection ends it): a connection closed with unread bytes
/// resets, and the client would get "broken pipe" instead of its answer.
pub(crate) async fn drain(body: &mut Incoming) {
    let mut seen = 0usize;
    while let Ok(Some(data)) = next_chunk(body).await {
        seen += data.len();
        if seen > 16 << 20 {
            break;
        }
    }
}

/// Reads exactly `len` bytes of the body (a stall of [`STALL`] ends it).
async fn receive_bytes(body: &mut Incoming, len: u64) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(len as usize);
    loop {
        let Some(data) = next_chunk(body).await? else {
            break;
        };
        if out.len() as u64 + data.len() as u64 > len {
            return Err("more bytes than the upload announced".into());
        }
        out.extend_from_slice(&data);
    }
    if out.len() as u64 != len {
        return Err(format!("{} of {len} bytes arrived", out.len()));
    }
    Ok(out)
}

/// Streams the body into `path` (0600, created new), exactly `len` bytes, synced.
async fn receive(
    body: &mut Incoming,
    path: &PathBuf,
    len: u64,
    progress: &Progress,
) -> Result<(), String> {
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut done = 0u64;
    loop {
        let Some(data) = next_chunk(body).await? else {
            break;
        };
        done += data.len() as u64;
        if done > len {
            return Err("more bytes than the upload announced".into());
        }
        f.write_all(&data)
            .await
            .map_err(|e| format!("writing: {e}"))?;
        progress.done.store(done, Ordering::Relaxed);
    }
    if done != len {
        return Err(format!("{done} of {len} bytes arrived"));
    }
    f.sync_all().await.map_err(|e| format!("writing: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::upload_name;

    #[test]
    fn upload_names_are_plain_model_files() {
        assert_eq!(
            upload_name("SmolLM2.Q4_1.gguf").as_deref(),
            Some("SmolLM2.Q4_1.gguf")
        );
        assert_eq!(
            upload_name("C:\\Users\\me\\m.gguf").as_deref(),
            Some("m.gguf")
        );
        assert_eq!(upload_name("bundle.tar").as_deref(), Some("bundle.tar"));
        for bad in [
            "",
            ".gguf",
            "../../etc/passwd",
            "model.bin",
            "a b.gguf",
            "x.gguf/",
        ] {
            assert_eq!(upload_name(bad), None, "{bad}");
        }
    }
}
