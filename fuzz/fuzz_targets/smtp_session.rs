//! The SMTP session state machine: commands, pipelining, DATA and its end, over a stream
//! cut into reads of a fuzzed size. Oracles: every reply line is `NNN[ -]text CRLF`; no
//! message is queued without a real CRLF.CRLF in the input (no smuggling); every queued
//! message has recipients and fits the size limit.
#![no_main]

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

struct Script {
    input: Vec<u8>,
    pos: usize,
    step: usize,
    out: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl AsyncRead for Script {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self
            .step
            .min(self.input.len() - self.pos)
            .min(buf.remaining());
        let start = self.pos;
        buf.put_slice(&self.input[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Script {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        self.out.lock().unwrap().extend_from_slice(b);
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let w = bastide_fuzz::world();
    let (shared, queue) = bastide_fuzz::smtp();
    let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let io = Script {
        input: stream.to_vec(),
        pos: 0,
        step: usize::from(first) * 7 + 1,
        out: out.clone(),
    };
    let peer = "127.0.0.1".parse().unwrap();
    let _ = w
        .runtime
        .block_on(bastide::smtp::server::session_over(shared, io, peer));
    let out = out.lock().unwrap().clone();

    // Well-formed replies only.
    assert!(
        out.is_empty() || out.ends_with(b"\r\n"),
        "reply not CRLF-terminated"
    );
    let text = String::from_utf8(out).expect("replies are UTF-8");
    let mut queued = 0;
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        let b = line.as_bytes();
        assert!(
            b.len() >= 4 && b[..3].iter().all(u8::is_ascii_digit) && (b[3] == b' ' || b[3] == b'-'),
            "malformed reply line {line:?}"
        );
        assert!(!line.contains('\r') && !line.contains('\n'));
        if line.starts_with("250 2.0.0 Ok: queued") {
            queued += 1;
        }
    }
    // DATA ends only on CRLF.CRLF: never more messages than such sequences sent.
    let ends = stream.windows(5).filter(|w| w == b"\r\n.\r\n").count();
    assert!(
        queued <= ends,
        "{queued} messages queued with only {ends} CRLF.CRLF; replies: {text}"
    );

    let items = queue.list();
    assert_eq!(items.len(), queued, "queue and replies disagree");
    for it in items {
        assert!(!it.recipients.is_empty() && it.recipients.len() <= 5);
        assert!(it.size <= 65536 + 512, "message of {} bytes", it.size);
        let _ = queue.delete(&it.id);
    }
});
