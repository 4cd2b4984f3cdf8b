//! A client for the worker protocol (`appliance_api::worker`) over the worker's Unix socket.

use std::path::Path;
use std::time::Duration;

use appliance_api::worker::{Op, Request, Response, WireModelInfo, PROTOCOL_VERSION};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("worker socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the worker closed the connection")]
    Closed,
    #[error("the worker sent a line this client does not understand: {0}")]
    Protocol(String),
    #[error("the worker did not answer within {0:?}")]
    Timeout(Duration),
    #[error("unexpected answer from the worker: {0}")]
    Unexpected(String),
}

/// One connection to a worker. Closing it (dropping this) cancels any generation on it.
pub struct WorkerConn {
    lines: Lines<BufReader<OwnedReadHalf>>,
    w: OwnedWriteHalf,
}

impl WorkerConn {
    pub async fn connect(socket: &Path) -> Result<WorkerConn, ClientError> {
        let s = UnixStream::connect(socket).await?;
        let (r, w) = s.into_split();
        Ok(WorkerConn {
            lines: BufReader::new(r).lines(),
            w,
        })
    }

    pub async fn send(&mut self, op: Op) -> Result<(), ClientError> {
        let mut line = serde_json::to_vec(&Request {
            v: PROTOCOL_VERSION,
            op,
        })
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push(b'\n');
        self.w.write_all(&line).await?;
        Ok(())
    }

    /// The next line from the worker.
    pub async fn recv(&mut self) -> Result<Response, ClientError> {
        match self.lines.next_line().await? {
            Some(l) => serde_json::from_str(&l).map_err(|e| ClientError::Protocol(e.to_string())),
            None => Err(ClientError::Closed),
        }
    }

    /// Sends `op` and returns the first answer, within `timeout`.
    pub async fn call(&mut self, op: Op, timeout: Duration) -> Result<Response, ClientError> {
        tokio::time::timeout(timeout, async {
            self.send(op).await?;
            self.recv().await
        })
        .await
        .map_err(|_| ClientError::Timeout(timeout))?
    }
}

/// Connects and asks who the worker is.
pub async fn hello(socket: &Path, timeout: Duration) -> Result<WireModelInfo, ClientError> {
    let mut c = tokio::time::timeout(timeout, WorkerConn::connect(socket))
        .await
        .map_err(|_| ClientError::Timeout(timeout))??;
    match c.call(Op::Hello, timeout).await? {
        Response::Hello { model, .. } => Ok(model),
        other => Err(ClientError::Unexpected(format!("{other:?}"))),
    }
}

/// Connects and asks for the worker's load: (active, queued).
pub async fn health(socket: &Path, timeout: Duration) -> Result<(u64, u64), ClientError> {
    let mut c = tokio::time::timeout(timeout, WorkerConn::connect(socket))
        .await
        .map_err(|_| ClientError::Timeout(timeout))??;
    match c.call(Op::Health, timeout).await? {
        Response::Health {
            ok: true,
            active,
            queued,
        } => Ok((active, queued)),
        other => Err(ClientError::Unexpected(format!("{other:?}"))),
    }
}
