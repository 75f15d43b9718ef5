//! Bridges between the async side (object store streams) and blocking threads (zstd, child
//! process pipes): a `Write` that sends chunks down a channel, a `Read` that receives them, a
//! blocking copy in large chunks, and wider pipes to child processes.

use std::io::{self, Read, Write};

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

/// Collects written bytes into chunks of about `chunk` bytes and sends each down a channel.
/// Must be used from a blocking thread (it uses `blocking_send`).
pub(crate) struct ChunkSink {
    tx: mpsc::Sender<Bytes>,
    buf: BytesMut,
    chunk: usize,
}

impl ChunkSink {
    pub(crate) fn new(tx: mpsc::Sender<Bytes>, chunk: usize) -> ChunkSink {
        ChunkSink {
            tx,
            buf: BytesMut::with_capacity(chunk),
            chunk,
        }
    }

    fn send_buffered(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.buf.reserve(self.chunk);
        self.tx
            .blocking_send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }
}

impl Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= self.chunk {
            self.send_buffered()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffered()
    }
}

/// Reads chunks from a channel. An `Err` item fails the read (e.g. a checksum mismatch found
/// by the sender after the last chunk), the channel closing is end of file.
pub(crate) struct ChannelReader {
    rx: mpsc::Receiver<Result<Bytes, String>>,
    current: Bytes,
}

impl ChannelReader {
    pub(crate) fn new(rx: mpsc::Receiver<Result<Bytes, String>>) -> ChannelReader {
        ChannelReader {
            rx,
            current: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(reason)) => return Err(io::Error::other(reason)),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}

/// Counts bytes passing through a reader.
pub(crate) struct CountingReader<R> {
    pub(crate) inner: R,
    pub(crate) count: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Reads `input` to its end into `out` in chunks of up to 1 MiB.
pub(crate) fn copy_large(input: &mut impl Read, out: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// A 1 MiB pipe instead of 64 KiB: fewer wake-ups of the tool at the other end (pg_dump,
/// pg_restore) and of us. Best effort.
pub(crate) fn widen_pipe(file: &impl std::os::fd::AsFd) {
    #[cfg(target_os = "linux")]
    let _ = nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}
