//! Writing the bulk of a large upload with `O_DIRECT`, on its own I/O threads.
//!
//! Buffered writes copy every byte into the page cache and leave it dirty for the kernel to
//! write back; for a multi-gigabyte layer that evicts the hot blobs other builders are pulling,
//! and on a machine whose spare memory is cold (a freshly started VM) growing the page cache is
//! slower than the disk itself. Past `direct_io_above` (32 MiB by default) an upload's chunks go
//! to a stager thread, which copies them into block-aligned buffers, and a device thread, which
//! writes each full buffer straight to the device, while the request thread goes on hashing the
//! next chunks: hashing, copying and disk I/O overlap instead of taking turns. The first
//! bytes of every upload, and all of a small one, still go through the page cache, so the
//! common case of a layer pulled soon after it was pushed is served from memory (the same
//! trade as a web server's "direct I/O above this size" setting).
//!
//! Filesystems or devices that refuse `O_DIRECT` (or its alignment) are detected on the first
//! write and the upload continues buffered: the mode changes how bytes travel, never which
//! bytes land.

use std::fs::File;
use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::thread::JoinHandle;

use bytes::Bytes;
use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};

/// Alignment of buffer addresses, lengths and file offsets for `O_DIRECT`: a page, which
/// covers 512-byte and 4 KiB logical blocks alike.
pub const ALIGN: u64 = 4096;
const ALIGN_USIZE: usize = ALIGN as usize;
/// Size of one staged write. Large enough for the device to stream, small enough that an
/// upload's staging memory stays a few MiB.
const CHUNK: usize = 2 << 20;
/// Staging buffers per large upload: one filling, one queued, one being written.
const BUFFERS: usize = 3;
/// Received chunks queued for the I/O thread (each at most the HTTP layer's read buffer).
const QUEUED: usize = 8;

/// A heap buffer whose usable part starts on an `ALIGN` boundary.
struct AlignedBuf {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    fn empty() -> AlignedBuf {
        AlignedBuf {
            raw: Vec::new(),
            off: 0,
            len: 0,
        }
    }

    fn new() -> AlignedBuf {
        let raw = vec![0u8; CHUNK + ALIGN_USIZE];
        // `align_offset` may in principle decline to answer; an unaligned buffer only makes the
        // first direct write fail with EINVAL, after which the upload continues buffered.
        let off = match raw.as_ptr().align_offset(ALIGN_USIZE) {
            n if n < ALIGN_USIZE => n,
            _ => 0,
        };
        AlignedBuf { raw, off, len: 0 }
    }

    /// Copies as much of `data` as fits; returns how much.
    fn fill(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(CHUNK - self.len);
        let start = self.off + self.len;
        self.raw[start..start + n].copy_from_slice(&data[..n]);
        self.len += n;
        n
    }

    fn is_full(&self) -> bool {
        self.len == CHUNK
    }

    fn filled(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }
}

fn set_direct(file: &File, on: bool) -> io::Result<()> {
    let flags = fcntl_getfl(file)?;
    let flags = if on {
        flags | OFlags::DIRECT
    } else {
        flags - OFlags::DIRECT
    };
    fcntl_setfl(file, flags)?;
    Ok(())
}

fn is_einval(e: &io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error())
}

/// The device side: owns the file while the upload streams and writes each full buffer, in
/// order, while the stager fills the next one.
struct Device {
    file: File,
    direct: bool,
}

impl Device {
    /// Writes all of `data` at the file's offset. The aligned prefix goes in the current mode;
    /// an unaligned tail (only the last buffer has one) is written after leaving direct mode.
    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        let aligned = data.len() & !(ALIGN_USIZE - 1);
        self.write_all(&data[..aligned])?;
        if aligned < data.len() {
            self.leave_direct()?;
            self.write_all(&data[aligned..])?;
        }
        Ok(())
    }

    fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            match (&self.file).write(data) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The filesystem or device does not take this alignment (or a short write left
                // the rest unaligned): continue through the page cache.
                Err(e) if self.direct && is_einval(&e) => self.leave_direct()?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn leave_direct(&mut self) -> io::Result<()> {
        if self.direct {
            set_direct(&self.file, false)?;
            self.direct = false;
        }
        Ok(())
    }

    fn run(
        mut self,
        full: Receiver<AlignedBuf>,
        empty: SyncSender<AlignedBuf>,
    ) -> io::Result<File> {
        while let Ok(mut buf) = full.recv() {
            self.write(buf.filled())?;
            buf.len = 0;
            // The stager may be gone (upload dropped); the buffer is simply freed then.
            let _ = empty.try_send(buf);
        }
        // The stager closed: the upload is complete.
        self.leave_direct()?;
        Ok(self.file)
    }
}

/// The staging side: copies received chunks into aligned buffers and queues each full one for
/// the device thread, so copying overlaps the device's write of the previous buffer.
struct Stager {
    cur: AlignedBuf,
    full: SyncSender<AlignedBuf>,
    empty: Receiver<AlignedBuf>,
    allocated: usize,
}

impl Stager {
    /// Queues the current buffer; false when the device thread has stopped (its error is
    /// collected by joining it).
    fn hand_over(&mut self) -> bool {
        let next = match self.empty.try_recv() {
            Ok(b) => b,
            Err(TryRecvError::Empty) if self.allocated < BUFFERS => {
                self.allocated += 1;
                AlignedBuf::new()
            }
            Err(_) => match self.empty.recv() {
                Ok(b) => b,
                Err(_) => return false,
            },
        };
        let buf = std::mem::replace(&mut self.cur, next);
        self.full.send(buf).is_ok()
    }

    fn run(
        mut self,
        chunks: Receiver<Bytes>,
        device: JoinHandle<io::Result<File>>,
    ) -> io::Result<File> {
        let mut ok = true;
        'recv: while let Ok(chunk) = chunks.recv() {
            let mut data = &chunk[..];
            while !data.is_empty() {
                let n = self.cur.fill(data);
                data = &data[n..];
                if self.cur.is_full() && !self.hand_over() {
                    ok = false;
                    break 'recv;
                }
            }
        }
        // The sender closed (the upload is complete) or the device failed.
        if ok && self.cur.len > 0 {
            let _ = self
                .full
                .send(std::mem::replace(&mut self.cur, AlignedBuf::empty()));
        }
        drop(self.full);
        match device.join() {
            Ok(r) => r,
            Err(_) => Err(io::Error::other("upload device thread panicked")),
        }
    }
}

type Pipeline = (SyncSender<Bytes>, JoinHandle<io::Result<File>>);

/// Starts the device and stager threads for `file`; the sender feeds the stager, whose handle
/// yields the file at the end.
fn spawn_pipeline(file: File) -> io::Result<Pipeline> {
    let (full_tx, full_rx) = mpsc::sync_channel::<AlignedBuf>(BUFFERS);
    let (empty_tx, empty_rx) = mpsc::sync_channel::<AlignedBuf>(BUFFERS);
    let device = Device { file, direct: true };
    let device = std::thread::Builder::new()
        .name("hoard-upload-dev".into())
        .spawn(move || device.run(full_rx, empty_tx))?;
    let stager = Stager {
        cur: AlignedBuf::new(),
        full: full_tx,
        empty: empty_rx,
        allocated: 1,
    };
    let (tx, rx) = mpsc::sync_channel::<Bytes>(QUEUED);
    // If this spawn fails the device thread sees its channel close and ends on its own.
    let stager = std::thread::Builder::new()
        .name("hoard-upload-stage".into())
        .spawn(move || stager.run(rx, device))?;
    Ok((tx, stager))
}

/// The request side of a direct upload: hands received chunks (shared, not copied) to the
/// stager and device threads, which copy and write them while the caller hashes the next ones.
pub struct DirectWriter {
    tx: Option<SyncSender<Bytes>>,
    io: Option<JoinHandle<io::Result<File>>>,
}

impl DirectWriter {
    /// Switches `file` (positioned at an `ALIGN` multiple) to direct I/O and starts its I/O
    /// threads. When the filesystem refuses, the file comes back unchanged for buffered writes.
    pub fn start(file: File) -> Result<DirectWriter, File> {
        if let Err(e) = set_direct(&file, true) {
            tracing::debug!(error = %e, "O_DIRECT unavailable; writing through the page cache");
            return Err(file);
        }
        // The file moves into the thread only if the thread starts: keep a handle to undo.
        let undo = match file.try_clone() {
            Ok(f) => f,
            Err(_) => {
                let _ = set_direct(&file, false);
                return Err(file);
            }
        };
        match spawn_pipeline(file) {
            Ok((tx, handle)) => Ok(DirectWriter {
                tx: Some(tx),
                io: Some(handle),
            }),
            Err(e) => {
                tracing::debug!(error = %e, "no upload I/O threads; writing through the page cache");
                let _ = set_direct(&undo, false);
                Err(undo)
            }
        }
    }

    pub fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        match &self.tx {
            Some(tx) if tx.send(chunk).is_ok() => Ok(()),
            _ => Err(self.failed()),
        }
    }

    /// The I/O thread stopped: collect its error.
    fn failed(&mut self) -> io::Error {
        self.tx = None;
        match self.io.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => e,
            Some(Ok(Ok(_))) => io::Error::other("upload I/O thread ended early"),
            Some(Err(_)) => io::Error::other("upload I/O thread panicked"),
            None => io::Error::other("upload already failed"),
        }
    }

    /// Writes what is staged, waits for the I/O thread and returns the file, back in buffered
    /// mode and positioned at the end of the upload.
    pub fn finish(mut self) -> io::Result<File> {
        self.tx = None;
        match self.io.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(io::Error::other("upload I/O thread panicked")),
            None => Err(io::Error::other("upload already failed")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn writes_every_byte_in_order_at_any_chunking() {
        for total in [0, 1, 4095, 4096, CHUNK - 1, CHUNK, 3 * CHUNK + 12345] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f");
            let mut file = File::create(&path).unwrap();
            // Start at an aligned offset past some buffered bytes, as an upload does.
            let head = pattern(8192);
            file.write_all(&head).unwrap();
            let data = pattern(total);
            let mut w = match DirectWriter::start(file) {
                Ok(w) => w,
                Err(_) => panic!("O_DIRECT refused on the test filesystem and no fallback ran"),
            };
            for piece in data.chunks(100_003) {
                w.write(Bytes::copy_from_slice(piece)).unwrap();
            }
            let mut file = w.finish().unwrap();
            // Back in buffered mode and at the end: a further write appends.
            file.write_all(b"tail").unwrap();
            let flags = fcntl_getfl(&file).unwrap();
            assert!(!flags.contains(OFlags::DIRECT));
            let mut got = Vec::new();
            file.seek(SeekFrom::Start(0)).unwrap();
            File::open(&path).unwrap().read_to_end(&mut got).unwrap();
            let mut want = head.clone();
            want.extend_from_slice(&data);
            want.extend_from_slice(b"tail");
            assert_eq!(got.len(), want.len(), "total {total}");
            assert!(got == want, "content differs at total {total}");
        }
    }

    #[test]
    fn unaligned_start_falls_back_to_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut file = File::create(&path).unwrap();
        file.write_all(b"abc").unwrap(); // offset 3: direct writes there fail with EINVAL
        let data = pattern(CHUNK + 5000);
        let mut w = DirectWriter::start(file).unwrap_or_else(|_| panic!("start"));
        w.write(Bytes::from(data.clone())).unwrap();
        w.finish().unwrap();
        let got = std::fs::read(&path).unwrap();
        assert_eq!(&got[..3], b"abc");
        assert!(got[3..] == data[..]);
    }
}
