//! An upload's own I/O thread: the request thread hashes each chunk and hands it on, and this
//! thread writes it, so hashing (the bottleneck of a single-stream push) and writing overlap
//! instead of taking turns. Only large uploads start one (past 32 MiB, or `direct_io_above` if
//! that is smaller); smaller ones are written where they are hashed.
//!
//! The thread writes through the page cache, so a layer pulled soon after it was pushed is served
//! from memory. With group commit the upload is answered before its bytes reach the disk and the
//! group commit flushes them; with `durability = "sync"` the thread also has a helper flush what
//! it wrote every 16 MiB (`WriteBehind`), so the disk works while the rest streams in and the
//! final fsync finds little left. Where an operator sets `direct_io_above` to keep
//! multi-gigabyte layers out of the page cache, the thread switches the file to `O_DIRECT` past
//! that offset (the same trade as a web server's "direct I/O above this size" setting): measured
//! here, one write at a time to the device ran at 60-80% of the speed of the page cache plus
//! write-behind. The chunks arrive in block-aligned buffers (`chunk.rs`), which the device takes
//! as they are; only a chunk that does not start on a block boundary (after an odd-sized PATCH)
//! is copied into a staging buffer first.
//!
//! Filesystems or devices that refuse `O_DIRECT` (or its alignment) are detected on the first
//! write and the upload continues buffered: the mode changes how bytes travel, never which
//! bytes land.

use std::fs::File;
use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use bytes::Bytes;
use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};

use super::chunk::{is_aligned, ChunkBuf, ALIGN};

/// Received chunks queued for the I/O thread (each at most a `ChunkBuf`, 512 KiB).
const QUEUED: usize = 2;

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

/// The file and the mode it is in.
struct Out {
    file: File,
    direct: bool,
}

impl Out {
    /// Writes all of `data` at the file's offset. The aligned prefix goes in the current mode;
    /// an unaligned tail (only the last write has one) is written after leaving direct mode.
    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        let aligned = data.len() & !(ALIGN - 1);
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
}

/// The I/O thread: owns the file while the upload streams and writes each chunk, in order,
/// while the request thread hashes the next one.
struct Device {
    out: Out,
    /// The file offset where writing switches to `O_DIRECT`, until it is reached.
    direct_at: Option<u64>,
    /// The file offset, counted until the switch.
    offset: u64,
    /// Bytes not yet written because they do not fill a block-aligned run: only after a chunk
    /// that did not start on a block boundary in memory (a client sending odd-sized PATCHes).
    stage: Option<ChunkBuf>,
    /// Flushes written bytes to the disk as the upload goes (uploads that are synced before
    /// their answer).
    behind: Option<WriteBehind>,
}

/// Has a helper thread flush what an upload has written so far every `every` bytes, so that the
/// disk writes while the next bytes are hashed and received. Without it an upload that must be
/// on disk before its answer (`durability = "sync"`) leaves the whole file to one fsync at the
/// end, and the disk idles while the bytes stream in (the write-behind of a database's
/// `bytes_per_sync`).
struct WriteBehind {
    every: u64,
    pending: u64,
    kick: SyncSender<()>,
    flusher: JoinHandle<io::Result<()>>,
}

impl WriteBehind {
    fn start(file: &File, every: u64) -> Option<WriteBehind> {
        let file = file.try_clone().ok()?;
        // One queued request at most: a flush requested while one runs covers every byte
        // written by the time it starts.
        let (kick, requests) = mpsc::sync_channel::<()>(1);
        let flusher = std::thread::Builder::new()
            .name("hoard-upload-flush".into())
            .spawn(move || {
                while requests.recv().is_ok() {
                    file.sync_data()?;
                }
                Ok(())
            })
            .ok()?;
        Some(WriteBehind {
            every,
            pending: 0,
            kick,
            flusher,
        })
    }

    fn wrote(&mut self, n: usize) {
        self.pending += n as u64;
        if self.pending >= self.every {
            self.pending = 0;
            let _ = self.kick.try_send(());
        }
    }

    /// Waits for the flushes under way; their error, if any, is the upload's.
    fn finish(self) -> io::Result<()> {
        drop(self.kick);
        self.flusher
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("upload flush thread panicked")))
    }
}

impl Device {
    fn take(&mut self, chunk: &[u8]) -> io::Result<()> {
        self.write(chunk)?;
        // Bytes written with O_DIRECT are on the device already.
        if let (Some(b), false) = (&mut self.behind, self.out.direct) {
            b.wrote(chunk.len());
        }
        Ok(())
    }

    fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        let mut data = chunk;
        if let Some(at) = self.direct_at {
            let end = self.offset + data.len() as u64;
            if end <= at {
                self.offset = end;
                return self.out.write_all(data);
            }
            // Up to the switch through the page cache, the rest directly.
            let k = at.saturating_sub(self.offset) as usize;
            self.out.write_all(&data[..k])?;
            data = &data[k..];
            self.direct_at = None;
            match set_direct(&self.out.file, true) {
                Ok(()) => self.out.direct = true,
                Err(e) => {
                    tracing::debug!(error = %e, "O_DIRECT unavailable; writing through the page cache")
                }
            }
        }
        let staged = self.stage.as_ref().is_some_and(|s| !s.is_empty());
        // The common case: a full buffer from the network side, aligned in memory and, since
        // nothing is staged, at an aligned file offset. It goes to the device as it is.
        if !staged && (is_aligned(data) || !self.out.direct) {
            let n = if self.out.direct {
                data.len() & !(ALIGN - 1)
            } else {
                data.len()
            };
            self.out.write_all(&data[..n])?;
            data = &data[n..];
        }
        while !data.is_empty() {
            let stage = self.stage.get_or_insert_with(ChunkBuf::new);
            let n = stage.fill(data);
            data = &data[n..];
            if stage.is_full() {
                self.out.write_all(stage.filled())?;
                stage.clear();
            }
        }
        Ok(())
    }

    fn run(mut self, chunks: Receiver<Bytes>) -> io::Result<File> {
        while let Ok(chunk) = chunks.recv() {
            self.take(&chunk)?;
        }
        // The sender closed: the upload is complete.
        if let Some(stage) = self.stage.take() {
            self.out.write(stage.filled())?;
        }
        self.out.leave_direct()?;
        if let Some(b) = self.behind.take() {
            b.finish()?;
        }
        Ok(self.out.file)
    }
}

/// The request side: hands chunks (shared, not copied) to the I/O thread, which writes them
/// while the caller hashes the next ones.
pub struct IoThread {
    tx: Option<SyncSender<Bytes>>,
    io: Option<JoinHandle<io::Result<File>>>,
}

impl IoThread {
    /// Starts the I/O thread for `file`, positioned at `offset`; bytes from file offset
    /// `direct_at` (a multiple of `ALIGN`) on are written with `O_DIRECT`, and with
    /// `write_behind` what is written is flushed to the disk every that many bytes. When no
    /// thread can start, the file comes back for the caller to write itself.
    pub fn start(
        file: File,
        offset: u64,
        direct_at: u64,
        write_behind: Option<u64>,
    ) -> Result<IoThread, File> {
        // The file moves into the thread only if the thread starts: keep a handle to return.
        let undo = match file.try_clone() {
            Ok(f) => f,
            Err(_) => return Err(file),
        };
        let behind = write_behind.and_then(|every| WriteBehind::start(&file, every));
        let device = Device {
            out: Out {
                file,
                direct: false,
            },
            direct_at: Some(direct_at),
            offset,
            stage: None,
            behind,
        };
        let (tx, rx) = mpsc::sync_channel::<Bytes>(QUEUED);
        match std::thread::Builder::new()
            .name("hoard-upload-io".into())
            .spawn(move || device.run(rx))
        {
            Ok(handle) => Ok(IoThread {
                tx: Some(tx),
                io: Some(handle),
            }),
            Err(e) => {
                tracing::debug!(error = %e, "no upload I/O thread; writing on the request thread");
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
    use super::super::chunk::CHUNK;
    use super::*;
    use std::io::{Read, Seek, SeekFrom};

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    /// Splits `data` as the network side would: into pooled, aligned buffers of `sizes` (cycled).
    fn pooled(data: &[u8], sizes: &[usize]) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut rest = data;
        for &n in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let mut b = ChunkBuf::new();
            let k = b.fill(&rest[..n.min(rest.len())]);
            rest = &rest[k..];
            out.push(b.into_bytes());
        }
        out
    }

    #[test]
    fn writes_every_byte_in_order_at_any_chunking() {
        type Split = fn(&[u8]) -> Vec<Bytes>;
        let splits: [(&str, Split); 3] = [
            // Unaligned heap pieces: every byte goes through the staging buffer.
            ("copied", |d| {
                d.chunks(100_003).map(Bytes::copy_from_slice).collect()
            }),
            // Full aligned buffers: written as they are, without a copy.
            ("aligned", |d| pooled(d, &[CHUNK])),
            // An odd-sized piece between aligned buffers forces staging mid-stream.
            ("mixed", |d| {
                pooled(d, &[CHUNK, 4096, 777, CHUNK, CHUNK - 777])
            }),
        ];
        // Without and with write-behind flushes (every three pages: many, mid-stream).
        for (name, split, behind) in splits
            .into_iter()
            .flat_map(|(n, s)| [(n, s, None), (n, s, Some(12_288))])
        {
            // The switch to O_DIRECT: where the thread starts, within the first chunk, later.
            for (total, direct_at) in [
                (0, 8192),
                (1, 8192),
                (4095, 8192),
                (4096, 8192),
                (CHUNK - 1, 8192),
                (CHUNK, 8192),
                (3 * CHUNK + 12345, 8192),
                (3 * CHUNK + 12345, 8192 + 4096),
                (3 * CHUNK + 12345, 8192 + 2 * CHUNK as u64),
                (CHUNK, 8192 + 8 * CHUNK as u64),
            ] {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("f");
                let mut file = File::create(&path).unwrap();
                // Start past some bytes written by the caller, as an upload does.
                let head = pattern(8192);
                file.write_all(&head).unwrap();
                let data = pattern(total);
                let mut w = match IoThread::start(file, 8192, direct_at, behind) {
                    Ok(w) => w,
                    Err(_) => panic!("no I/O thread"),
                };
                for piece in split(&data) {
                    w.write(piece).unwrap();
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
                assert_eq!(
                    got.len(),
                    want.len(),
                    "{name}: total {total} at {direct_at}"
                );
                assert!(
                    got == want,
                    "{name}: content differs at total {total} at {direct_at}, {behind:?}"
                );
            }
        }
    }

    #[test]
    fn unaligned_start_falls_back_to_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut file = File::create(&path).unwrap();
        file.write_all(b"abc").unwrap(); // offset 3: direct writes there fail with EINVAL
        let data = pattern(CHUNK + 5000);
        let mut w = IoThread::start(file, 3, 3, None).unwrap_or_else(|_| panic!("start"));
        w.write(Bytes::from(data.clone())).unwrap();
        w.finish().unwrap();
        let got = std::fs::read(&path).unwrap();
        assert_eq!(&got[..3], b"abc");
        assert!(got[3..] == data[..]);
    }
}
