//! An over-long URL gets 414, not 431, without a bigger buffer.
//!
//! hyper answers 414 only once it holds a whole request line, up to 64 KiB
//! in its read buffer; with the head capped at [`MAX_HEAD_BYTES`] (so that a
//! few thousand connections cannot hold the container's memory), it answers
//! an over-long URL 431, "header fields too large", which tells a client
//! the wrong thing to shorten. So the first request line of each connection
//! is measured as its bytes pass through to hyper, holding nothing: once it
//! passes the head limit without ending, the connection is answered 414 and
//! closed. Before closing, what the client is still sending is read and
//! dropped (up to [`DRAIN_LIMIT`], within hyper's head deadline): closing a
//! socket with unread bytes sends a reset, which can destroy the answer
//! before the client reads it. Later requests on a keep-alive connection are not measured (the
//! wrapper cannot tell where a body ends and the next head begins); an
//! over-long URL there still meets hyper's 431.
//!
//! [`MAX_HEAD_BYTES`]: crate::server::MAX_HEAD_BYTES

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a refused connection is told. No body: the client never got as far
/// as a request hyper could route, as with hyper's own 431.
const ANSWER: &[u8] =
    b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// The most a refused client may send after its answer before the
/// connection is cut: enough for the rest of any request the gateway takes.
const DRAIN_LIMIT: u64 = 4 * 1024 * 1024;

/// A connection whose first request line is measured as it arrives.
pub struct FirstLineLimit<S> {
    inner: S,
    limit: usize,
    state: State,
    refused: Arc<AtomicBool>,
}

enum State {
    /// Bytes of the first line seen so far, none of them a line end.
    Measuring(usize),
    /// The first line ended in time: everything passes through untouched.
    Passing,
    /// Over the limit: the answer is being written, this much of it so far.
    Answering(usize),
    /// Answered: what the client still sends is dropped, this much so far,
    /// until it closes.
    Draining(u64),
    /// Drained: reads see the end of the stream, so hyper closes.
    Answered,
}

impl<S> FirstLineLimit<S> {
    /// `refused` is set when the connection is answered 414, for the caller
    /// to count once the connection ends.
    pub fn new(inner: S, limit: usize, refused: Arc<AtomicBool>) -> FirstLineLimit<S> {
        FirstLineLimit {
            inner,
            limit,
            state: State::Measuring(0),
            refused,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> FirstLineLimit<S> {
    /// Writes the 414 (the socket is fresh, so this rarely waits) and ends
    /// the gateway's side of the connection, then drains the client's.
    fn answer(&mut self, cx: &mut Context<'_>, mut written: usize) -> Poll<io::Result<()>> {
        while written < ANSWER.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &ANSWER[written..]) {
                Poll::Ready(Ok(0)) => {
                    self.state = State::Answered;
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(e)) => {
                    self.state = State::Answered;
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {
                    self.state = State::Answering(written);
                    return Poll::Pending;
                }
            }
        }
        self.state = State::Answering(written);
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        // The end of our side tells the client the answer is whole, so it
        // closes its side, which ends the drain.
        ready!(Pin::new(&mut self.inner).poll_shutdown(cx))?;
        self.state = State::Draining(0);
        self.drain(cx, 0)
    }

    /// Reads and drops the rest of the refused request, then reports the
    /// end of the stream.
    fn drain(&mut self, cx: &mut Context<'_>, mut dropped: u64) -> Poll<io::Result<()>> {
        let mut scratch = [0u8; 4096];
        while dropped <= DRAIN_LIMIT {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => break,
                Poll::Ready(Ok(())) => dropped += buf.filled().len() as u64,
                Poll::Ready(Err(_)) => break,
                Poll::Pending => {
                    self.state = State::Draining(dropped);
                    return Poll::Pending;
                }
            }
        }
        self.state = State::Answered;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for FirstLineLimit<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let seen = match self.state {
            State::Passing => return Pin::new(&mut self.inner).poll_read(cx, buf),
            State::Answered => return Poll::Ready(Ok(())),
            State::Answering(written) => return self.answer(cx, written),
            State::Draining(dropped) => return self.drain(cx, dropped),
            State::Measuring(seen) => seen,
        };
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let arrived = &buf.filled()[before..];
        // Empty lines before the request line are not its end (hyper skips
        // them, as HTTP allows), and a line whose end lies past the limit is
        // over it, however much of it came in one read.
        let skip = if seen == 0 {
            arrived
                .iter()
                .take_while(|b| **b == b'\r' || **b == b'\n')
                .count()
        } else {
            0
        };
        let line = &arrived[skip..];
        let end = line.iter().position(|b| *b == b'\n');
        if arrived.is_empty() {
            self.state = State::Measuring(seen);
        } else if end.is_some_and(|e| seen + e <= self.limit) {
            self.state = State::Passing;
        } else if end.is_some() || seen + line.len() > self.limit {
            // hyper never sees these bytes: it gets the end of the stream
            // with a partial head, which it closes without answering.
            buf.set_filled(before);
            self.refused.store(true, Ordering::Relaxed);
            return self.answer(cx, 0);
        } else {
            self.state = State::Measuring(seen + line.len());
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstLineLimit<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    async fn through(request: &[u8], limit: usize) -> (Vec<u8>, Vec<u8>, bool) {
        let (client, server) = duplex(1 << 20);
        let refused = Arc::new(AtomicBool::new(false));
        let mut server = FirstLineLimit::new(server, limit, refused.clone());
        let (mut client_read, mut client_write) = tokio::io::split(client);
        client_write.write_all(request).await.unwrap();
        // The end of the request, as a client's half-close.
        client_write.shutdown().await.unwrap();
        let mut passed = Vec::new();
        server.read_to_end(&mut passed).await.unwrap();
        drop(server);
        let mut answer = Vec::new();
        client_read.read_to_end(&mut answer).await.unwrap();
        (passed, answer, refused.load(Ordering::Relaxed))
    }

    #[tokio::test]
    async fn a_line_that_ends_in_time_passes_whole() {
        let long_body = vec![b'x'; 100_000];
        let mut request = b"POST /a HTTP/1.1\r\nContent-Length: 100000\r\n\r\n".to_vec();
        request.extend_from_slice(&long_body);
        let (passed, answer, refused) = through(&request, 64).await;
        assert_eq!(
            passed, request,
            "a long body after a short line is untouched"
        );
        assert!(answer.is_empty());
        assert!(!refused);
    }

    #[tokio::test]
    async fn a_line_over_the_limit_is_answered_414_and_ends_the_stream() {
        let mut request = b"POST /a?".to_vec();
        request.extend(std::iter::repeat_n(b'c', 1000));
        let (passed, answer, refused) = through(&request, 64).await;
        assert!(passed.len() <= 64, "hyper saw {} bytes", passed.len());
        assert_eq!(answer, ANSWER);
        assert!(refused);
    }

    #[tokio::test]
    async fn a_line_exactly_at_the_limit_is_still_measured_not_refused() {
        let request = vec![b'c'; 64];
        let (passed, answer, refused) = through(&request, 64).await;
        assert_eq!(passed, request);
        assert!(answer.is_empty());
        assert!(!refused);
    }
}
