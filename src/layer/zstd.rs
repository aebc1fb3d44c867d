//! Random access into multi-frame zstd streams: while a layer is decompressed once (to index its
//! tar), the start of a frame is recorded every `spacing` bytes of output (compressed and
//! uncompressed offsets). A frame decodes on its own, so a later read decompresses from the
//! nearest recorded frame before it. A single-frame stream has one start (0): reads then
//! decompress from the beginning, and the spans they pass are kept in the chunk cache.

use std::io::{self, Read};

use zstd::zstd_safe::{DCtx, InBuffer, OutBuffer};

use super::index::FrameStart;

/// Decompresses a zstd stream and records frame starts.
pub struct FrameIndexer<R> {
    src: R,
    dctx: DCtx<'static>,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    in_total: u64,
    out_total: u64,
    at_frame_start: bool,
    spacing: u64,
    pub frames: Vec<FrameStart>,
}

impl<R: Read> FrameIndexer<R> {
    pub fn new(src: R, spacing: u64) -> Self {
        FrameIndexer {
            src,
            dctx: DCtx::create(),
            buf: vec![0; 128 * 1024],
            pos: 0,
            len: 0,
            in_total: 0,
            out_total: 0,
            at_frame_start: true,
            spacing,
            frames: Vec::new(),
        }
    }
}

impl<R: Read> Read for FrameIndexer<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if self.pos == self.len {
                self.pos = 0;
                self.len = self.src.read(&mut self.buf)?;
                if self.len == 0 {
                    return if self.at_frame_start {
                        Ok(0)
                    } else {
                        Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "truncated zstd stream",
                        ))
                    };
                }
            }
            if self.at_frame_start {
                let far = self
                    .frames
                    .last()
                    .is_none_or(|f| self.out_total - f.out >= self.spacing);
                if far {
                    self.frames.push(FrameStart {
                        out: self.out_total,
                        input: self.in_total,
                    });
                }
                self.at_frame_start = false;
            }
            let mut input = InBuffer::around(&self.buf[self.pos..self.len]);
            let mut output = OutBuffer::around(&mut *out);
            let hint = self
                .dctx
                .decompress_stream(&mut output, &mut input)
                .map_err(|c| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "corrupt zstd stream: {}",
                            zstd::zstd_safe::get_error_name(c)
                        ),
                    )
                })?;
            let (consumed, produced) = (input.pos(), output.pos());
            self.pos += consumed;
            self.in_total += consumed as u64;
            self.out_total += produced as u64;
            if hint == 0 {
                self.at_frame_start = true;
            }
            if produced > 0 {
                return Ok(produced);
            }
        }
    }
}

/// The last recorded frame start at or before uncompressed offset `at`.
pub fn nearest(frames: &[FrameStart], at: u64) -> Option<FrameStart> {
    let i = frames.partition_point(|f| f.out <= at);
    i.checked_sub(1).map(|i| frames[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<u8> {
        (0..n)
            .map(|i| ((i as u64 * 31 + seed) % 251) as u8)
            .collect()
    }

    #[test]
    fn records_frames_and_reads_from_them() {
        let parts: Vec<Vec<u8>> = (0..6).map(|i| data(300_000, i)).collect();
        let mut comp = Vec::new();
        for p in &parts {
            comp.extend(zstd::encode_all(&p[..], 3).unwrap());
        }
        let whole: Vec<u8> = parts.concat();
        let mut ix = FrameIndexer::new(&comp[..], 500_000);
        let mut all = Vec::new();
        ix.read_to_end(&mut all).unwrap();
        assert_eq!(all, whole);
        assert_eq!(ix.frames.len(), 3, "{:?}", ix.frames);
        let at = 1_400_000u64;
        let f = nearest(&ix.frames, at).unwrap();
        let mut d = zstd::stream::read::Decoder::new(&comp[f.input as usize..]).unwrap();
        std::io::copy(&mut (&mut d).take(at - f.out), &mut std::io::sink()).unwrap();
        let mut got = vec![0; 1000];
        d.read_exact(&mut got).unwrap();
        assert_eq!(got, &whole[at as usize..at as usize + 1000]);
    }

    #[test]
    fn truncated_and_garbage_are_errors() {
        let comp = zstd::encode_all(&data(100_000, 1)[..], 3).unwrap();
        assert!(FrameIndexer::new(&comp[..comp.len() / 2], 1)
            .read_to_end(&mut Vec::new())
            .is_err());
        assert!(FrameIndexer::new(&b"\x28\xb5\x2f\xfdgarbage"[..], 1)
            .read_to_end(&mut Vec::new())
            .is_err());
    }
}
