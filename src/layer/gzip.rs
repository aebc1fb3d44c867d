//! Random access into gzip streams, the zlib `zran` way: while a layer is inflated once (to index
//! its tar), a checkpoint is recorded every `spacing` bytes of output at a deflate block boundary:
//! the output and input offsets, the bit offset inside the input byte, and the 32 KiB window of
//! output before it. A later read inflates from the nearest checkpoint before it only.
//!
//! flate2 does not expose `inflatePrime`/`inflateSetDictionary`, so this module drives zlib
//! through `libz-sys`. Every unsafe call is on a `z_stream` this module owns. Multi-member gzip
//! (eStargz) is handled: at the end of a member the next header is parsed again.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::mem::MaybeUninit;

use libz_sys as z;

use super::index::Checkpoint;

/// Deflate's window: the most a back-reference can reach.
pub const WINDOW: usize = 32 * 1024;
/// zlib windowBits for "gzip or zlib header, detect" (zran.c).
const AUTO_HEADER: i32 = 47;
/// zlib windowBits for raw deflate.
const RAW: i32 = -15;

unsafe extern "C" fn zalloc(_: z::voidpf, items: z::uInt, size: z::uInt) -> z::voidpf {
    // SAFETY: calloc has no preconditions; zlib checks for null.
    unsafe { libc::calloc(items as usize, size as usize) }
}

unsafe extern "C" fn zfree(_: z::voidpf, p: z::voidpf) {
    // SAFETY: p came from zalloc (calloc) or is null.
    unsafe { libc::free(p) }
}

/// An owned, initialised zlib inflate stream.
struct Inflater {
    strm: Box<z::z_stream>,
}

// SAFETY: the z_stream is only used through &mut self; zlib keeps no thread-local state.
unsafe impl Send for Inflater {}

fn zerr(what: &str, code: i32) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{what}: zlib error {code}"),
    )
}

impl Inflater {
    fn new(window_bits: i32) -> io::Result<Self> {
        let mut m = Box::new(MaybeUninit::<z::z_stream>::zeroed());
        let p = m.as_mut_ptr();
        // SAFETY: p points to zeroed memory we own; the function pointers are written before
        // the value is assumed initialised (all other fields are valid when zero).
        let mut strm: Box<z::z_stream> = unsafe {
            std::ptr::addr_of_mut!((*p).zalloc).write(zalloc);
            std::ptr::addr_of_mut!((*p).zfree).write(zfree);
            Box::from_raw(Box::into_raw(m).cast::<z::z_stream>())
        };
        // SAFETY: strm is a valid z_stream with allocator functions set.
        let r = unsafe {
            z::inflateInit2_(
                &mut *strm,
                window_bits,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as i32,
            )
        };
        if r != z::Z_OK {
            return Err(zerr("inflateInit2", r));
        }
        Ok(Inflater { strm })
    }

    fn reset(&mut self, window_bits: i32) -> io::Result<()> {
        // SAFETY: initialised stream.
        let r = unsafe { z::inflateReset2(&mut *self.strm, window_bits) };
        if r == z::Z_OK {
            Ok(())
        } else {
            Err(zerr("inflateReset2", r))
        }
    }

    fn prime(&mut self, bits: u8, value: u8) -> io::Result<()> {
        // SAFETY: initialised stream.
        let r = unsafe {
            z::inflatePrime(
                &mut *self.strm,
                i32::from(bits),
                i32::from(value) >> (8 - i32::from(bits)),
            )
        };
        if r == z::Z_OK {
            Ok(())
        } else {
            Err(zerr("inflatePrime", r))
        }
    }

    fn set_dictionary(&mut self, dict: &[u8]) -> io::Result<()> {
        if dict.is_empty() {
            return Ok(());
        }
        // SAFETY: initialised stream; dict outlives the call (zlib copies it).
        let r =
            unsafe { z::inflateSetDictionary(&mut *self.strm, dict.as_ptr(), dict.len() as u32) };
        if r == z::Z_OK {
            Ok(())
        } else {
            Err(zerr("inflateSetDictionary", r))
        }
    }

    /// One inflate call. Returns (consumed, produced, return code, data_type).
    fn step(&mut self, input: &[u8], out: &mut [u8], flush: i32) -> (usize, usize, i32, i32) {
        self.strm.next_in = input.as_ptr() as *mut u8;
        self.strm.avail_in = input.len() as u32;
        self.strm.next_out = out.as_mut_ptr();
        self.strm.avail_out = out.len() as u32;
        // SAFETY: next_in/next_out point into live slices of the lengths given.
        let r = unsafe { z::inflate(&mut *self.strm, flush) };
        let consumed = input.len() - self.strm.avail_in as usize;
        let produced = out.len() - self.strm.avail_out as usize;
        self.strm.next_in = std::ptr::null_mut();
        self.strm.next_out = std::ptr::null_mut();
        (consumed, produced, r, self.strm.data_type)
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: initialised stream, ended once.
        unsafe { z::inflateEnd(&mut *self.strm) };
    }
}

/// Buffered compressed input.
struct Input<R> {
    src: R,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    /// Compressed offset of `buf[pos]`.
    offset: u64,
}

impl<R: Read> Input<R> {
    fn new(src: R, offset: u64) -> Self {
        Input {
            src,
            buf: vec![0; 64 * 1024],
            pos: 0,
            len: 0,
            offset,
        }
    }
    /// Make sure some input is buffered; false at end of input.
    fn fill(&mut self) -> io::Result<bool> {
        if self.pos < self.len {
            return Ok(true);
        }
        self.pos = 0;
        self.len = self.src.read(&mut self.buf)?;
        Ok(self.len > 0)
    }
    fn consume(&mut self, n: usize) {
        self.pos += n;
        self.offset += n as u64;
    }
    /// Skip `n` bytes of input (a gzip trailer in raw mode).
    fn skip(&mut self, mut n: usize) -> io::Result<()> {
        while n > 0 {
            if !self.fill()? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "truncated gzip trailer",
                ));
            }
            let k = n.min(self.len - self.pos);
            self.consume(k);
            n -= k;
        }
        Ok(())
    }
}

/// One inflate step over buffered input: (produced, stream ended, data_type). At the end of a
/// gzip member the next member, if any, is started (`skip_trailer` when inflating raw, since zlib
/// then leaves the member's 8-byte trailer unread). Returns `done` when the input is exhausted.
fn inflate_step<R: Read>(
    input: &mut Input<R>,
    inf: &mut Inflater,
    out: &mut [u8],
    flush: i32,
    skip_trailer: &mut bool,
) -> io::Result<(usize, bool, i32)> {
    if !input.fill()? {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "truncated gzip stream",
        ));
    }
    let (pos, len) = (input.pos, input.len);
    let (consumed, produced, r, data_type) = inf.step(&input.buf[pos..len], out, flush);
    input.consume(consumed);
    match r {
        z::Z_OK | z::Z_BUF_ERROR => Ok((produced, false, data_type)),
        z::Z_STREAM_END => {
            if *skip_trailer {
                input.skip(8)?; // CRC32 + ISIZE of the member
                *skip_trailer = false;
            }
            // Another member may follow (multi-member gzip, eStargz).
            let more = input.fill()?;
            if more {
                inf.reset(AUTO_HEADER)?;
            }
            Ok((produced, !more, data_type | STREAM_END))
        }
        code => Err(zerr("corrupt deflate stream", code)),
    }
}

/// Flag added to data_type by `inflate_step` when a member ended.
const STREAM_END: i32 = 1 << 16;

/// Inflates a whole gzip stream and records checkpoints every `spacing` output bytes.
pub struct Indexer<R> {
    input: Input<R>,
    inf: Inflater,
    out_total: u64,
    window: VecDeque<u8>,
    spacing: u64,
    last: u64,
    done: bool,
    pub checkpoints: Vec<Checkpoint>,
}

impl<R: Read> Indexer<R> {
    pub fn new(src: R, spacing: u64) -> io::Result<Self> {
        Ok(Indexer {
            input: Input::new(src, 0),
            inf: Inflater::new(AUTO_HEADER)?,
            out_total: 0,
            window: VecDeque::with_capacity(WINDOW + 64 * 1024),
            spacing,
            last: 0,
            done: false,
            checkpoints: Vec::new(),
        })
    }
}

impl<R: Read> Read for Indexer<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if self.done {
                return Ok(0);
            }
            let mut no_trailer = false;
            let (produced, done, data_type) = inflate_step(
                &mut self.input,
                &mut self.inf,
                out,
                z::Z_BLOCK,
                &mut no_trailer,
            )?;
            self.done = done;
            self.out_total += produced as u64;
            self.window.extend(&out[..produced]);
            if self.window.len() > WINDOW {
                let excess = self.window.len() - WINDOW;
                self.window.drain(..excess);
            }
            // At a block boundary (bit 7) that is not the end of the stream (bit 6).
            let boundary = data_type & 128 != 0 && data_type & 64 == 0;
            let ended = data_type & STREAM_END != 0;
            if boundary && !ended && self.out_total - self.last >= self.spacing {
                let window: Vec<u8> = self.window.iter().copied().collect();
                self.checkpoints.push(Checkpoint {
                    out: self.out_total,
                    input: self.input.offset,
                    bits: (data_type & 7) as u8,
                    window,
                });
                self.last = self.out_total;
            }
            if produced > 0 {
                return Ok(produced);
            }
        }
    }
}

/// Inflates from a checkpoint (or from the start) onwards.
pub struct FromCheckpoint<R> {
    input: Input<R>,
    inf: Inflater,
    /// Raw deflate (started at a checkpoint): member ends must skip the gzip trailer.
    raw: bool,
    done: bool,
}

impl<R: Read> FromCheckpoint<R> {
    /// `src` must yield the compressed stream from `cp.input - 1` when `cp.bits > 0`, else from
    /// `cp.input` (or from 0 when `cp` is None).
    pub fn new(mut src: R, cp: Option<&Checkpoint>) -> io::Result<Self> {
        let Some(cp) = cp else {
            return Ok(FromCheckpoint {
                input: Input::new(src, 0),
                inf: Inflater::new(AUTO_HEADER)?,
                raw: false,
                done: false,
            });
        };
        let mut inf = Inflater::new(RAW)?;
        if cp.bits > 0 {
            let mut b = [0u8; 1];
            src.read_exact(&mut b)?;
            inf.prime(cp.bits, b[0])?;
        }
        inf.set_dictionary(&cp.window)?;
        Ok(FromCheckpoint {
            input: Input::new(src, cp.input),
            inf,
            raw: true,
            done: false,
        })
    }

    /// Where the compressed bytes must start for `cp`.
    pub fn source_offset(cp: Option<&Checkpoint>) -> u64 {
        match cp {
            // saturating: a checkpoint loaded from --cache-dir is not trusted to be sane.
            Some(c) if c.bits > 0 => c.input.saturating_sub(1),
            Some(c) => c.input,
            None => 0,
        }
    }
}

impl<R: Read> Read for FromCheckpoint<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if self.done {
                return Ok(0);
            }
            let (produced, done, _) = inflate_step(
                &mut self.input,
                &mut self.inf,
                out,
                z::Z_NO_FLUSH,
                &mut self.raw,
            )?;
            self.done = done;
            if produced > 0 {
                return Ok(produced);
            }
        }
    }
}

/// The last checkpoint at or before uncompressed offset `at`.
pub fn nearest(checkpoints: &[Checkpoint], at: u64) -> Option<&Checkpoint> {
    let i = checkpoints.partition_point(|c| c.out <= at);
    i.checked_sub(1).map(|i| &checkpoints[i])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn data(n: usize) -> Vec<u8> {
        // Compressible but not trivial: words with a counter.
        let mut v = Vec::with_capacity(n + 32);
        let mut i = 0u64;
        while v.len() < n {
            write!(v, "line {i} {} ", i.wrapping_mul(2654435761) % 977).unwrap();
            i += 1;
        }
        v.truncate(n);
        v
    }

    fn gz(d: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(d).unwrap();
        e.finish().unwrap()
    }

    fn read_at(comp: &[u8], cps: &[Checkpoint], at: u64, len: usize) -> Vec<u8> {
        let cp = nearest(cps, at);
        let start = FromCheckpoint::<&[u8]>::source_offset(cp) as usize;
        let mut r = FromCheckpoint::new(&comp[start..], cp).unwrap();
        let skip = at - cp.map_or(0, |c| c.out);
        std::io::copy(&mut (&mut r).take(skip), &mut std::io::sink()).unwrap();
        let mut out = vec![0; len];
        r.read_exact(&mut out).unwrap();
        out
    }

    #[test]
    fn random_access_from_checkpoints() {
        let d = data(3 << 20);
        let comp = gz(&d);
        let mut ix = Indexer::new(&comp[..], 256 * 1024).unwrap();
        let mut all = Vec::new();
        ix.read_to_end(&mut all).unwrap();
        assert_eq!(all, d);
        assert!(
            ix.checkpoints.len() >= 8,
            "{} checkpoints",
            ix.checkpoints.len()
        );
        for at in [0u64, 1, 100_000, 1 << 20, (3 << 20) - 5000, 2_500_001] {
            assert_eq!(
                read_at(&comp, &ix.checkpoints, at, 4000),
                &d[at as usize..at as usize + 4000],
                "at {at}"
            );
        }
    }

    #[test]
    fn multi_member_streams() {
        let (a, b) = (data(700_000), data(900_000));
        let mut comp = gz(&a);
        comp.extend(gz(&b));
        let mut ix = Indexer::new(&comp[..], 100_000).unwrap();
        let mut all = Vec::new();
        ix.read_to_end(&mut all).unwrap();
        let whole: Vec<u8> = a.iter().chain(&b).copied().collect();
        assert_eq!(all, whole);
        // Across the member boundary, from a checkpoint in the first member.
        let at = 690_000u64;
        assert_eq!(
            read_at(&comp, &ix.checkpoints, at, 30_000),
            &whole[at as usize..at as usize + 30_000]
        );
    }

    #[test]
    fn truncated_and_garbage_input_are_errors() {
        let comp = gz(&data(200_000));
        let mut ix = Indexer::new(&comp[..comp.len() / 2], 50_000).unwrap();
        assert!(ix.read_to_end(&mut Vec::new()).is_err());
        let mut ix = Indexer::new(&b"\x1f\x8bnot really gzip at all"[..], 50_000).unwrap();
        assert!(ix.read_to_end(&mut Vec::new()).is_err());
        let mut ix = Indexer::new(&b""[..], 50_000).unwrap();
        assert!(ix.read_to_end(&mut Vec::new()).is_err());
    }
}
