//! One client connection: its protocol (chosen by ALPN, never sniffed), its activity
//! watch and its per-address accounting.
//!
//! A connection that has not sent a first request within the header timeout is closed,
//! and so is one with no byte in either direction and no request being handled for the
//! idle timeout (HTTP/1.1's idle keep-alive is also bounded by hyper's header timeout).
//! Together with the per-address cap, silent connections cannot hold every slot.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the watchdog of one connection looks at.
#[derive(Debug)]
pub(crate) struct ConnWatch {
    start: Instant,
    /// Milliseconds since `start` of the last byte read or written.
    last: AtomicU64,
    /// Requests received on this connection.
    pub requests: AtomicU64,
    /// Handlers running now (a stream's body counts as traffic, not as a handler).
    pub handlers: AtomicUsize,
}

impl ConnWatch {
    pub fn new() -> Arc<ConnWatch> {
        Arc::new(ConnWatch {
            start: Instant::now(),
            last: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            handlers: AtomicUsize::new(0),
        })
    }

    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    pub fn age(&self) -> Duration {
        self.start.elapsed()
    }

    /// Counts a handler for as long as the returned guard lives.
    pub fn handler(self: &Arc<Self>) -> HandlerGuard {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.handlers.fetch_add(1, Ordering::AcqRel);
        HandlerGuard(self.clone())
    }
}

pub(crate) struct HandlerGuard(Arc<ConnWatch>);

impl Drop for HandlerGuard {
    fn drop(&mut self) {
        self.0.handlers.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
    }
}

/// An I/O stream that records when bytes last moved, and closes lingering.
///
/// Its shutdown (hyper's, when it closes a connection) ends the write side, then reads
/// and drops what the client still sends, until it closes too, for at most
/// `LINGER_TIME` and `LINGER_BYTES`: a socket closed with unread bytes in its buffer
/// makes the kernel send a reset, which can destroy the answer the client has not read
/// yet (a 413 for an upload it is still sending).
pub(crate) struct Watched<T> {
    inner: T,
    watch: Arc<ConnWatch>,
    linger: Option<Linger>,
}

const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: u64 = 64 << 20;

struct Linger {
    until: Pin<Box<tokio::time::Sleep>>,
    left: u64,
    shut: bool,
}

impl<T> Watched<T> {
    pub fn new(inner: T, watch: Arc<ConnWatch>) -> Self {
        Watched {
            inner,
            watch,
            linger: None,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.watch.touch();
        }
        r
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.watch.touch();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.watch.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Watched { inner, linger, .. } = self.get_mut();
        let l = linger.get_or_insert_with(|| Linger {
            until: Box::pin(tokio::time::sleep(LINGER_TIME)),
            left: LINGER_BYTES,
            shut: false,
        });
        if !l.shut {
            std::task::ready!(Pin::new(&mut *inner).poll_shutdown(cx))?;
            l.shut = true;
        }
        let mut scratch = [0u8; 16 << 10];
        loop {
            if l.left == 0 || l.until.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut *inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    l.left = l.left.saturating_sub(buf.filled().len() as u64);
                }
                // The client closed (or the connection broke): done.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Open connections per client address, capped.
#[derive(Debug, Default)]
pub(crate) struct PerAddress {
    open: Mutex<HashMap<IpAddr, usize>>,
}

pub(crate) struct AddressSlot(Arc<PerAddress>, IpAddr);

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut m = self.0.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

impl PerAddress {
    pub fn try_open(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        let mut m = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(AddressSlot(self.clone(), ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_address_slots_are_capped_and_released() {
        let p = Arc::new(PerAddress::default());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = p.try_open(ip, 2).unwrap();
        let _b = p.try_open(ip, 2).unwrap();
        assert!(p.try_open(ip, 2).is_none());
        assert!(p.try_open("10.0.0.2".parse().unwrap(), 2).is_some());
        drop(a);
        assert!(p.try_open(ip, 2).is_some());
    }

    #[tokio::test]
    async fn a_shutdown_reads_what_the_client_still_sends_until_it_closes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::io::duplex(1024);
        let mut s = Watched::new(a, ConnWatch::new());
        // The client sends far more than the pipe holds, then reads the answer.
        let client = tokio::spawn(async move {
            b.write_all(&vec![b'x'; 1 << 20]).await?;
            b.shutdown().await?;
            let mut answer = vec![];
            b.read_to_end(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        });
        s.write_all(b"413").await.unwrap();
        let t = Instant::now();
        s.shutdown().await.unwrap();
        assert!(t.elapsed() < LINGER_TIME, "{:?}", t.elapsed());
        drop(s); // closed: what it had not read would be lost, and the client's send fail
        assert_eq!(client.await.unwrap().unwrap(), b"413");
    }

    #[tokio::test]
    async fn watched_streams_record_traffic() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::io::duplex(64);
        let w = ConnWatch::new();
        let mut s = Watched::new(a, w.clone());
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(w.idle_for() >= Duration::from_millis(30));
        s.write_all(b"hi").await.unwrap();
        assert!(w.idle_for() < Duration::from_millis(20));
        b.write_all(b"yo").await.unwrap();
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"yo");
    }
}
