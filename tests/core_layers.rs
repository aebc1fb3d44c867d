//! Fuzz-style: random, truncated and bit-flipped tar, gzip and zstd bytes fed to the index
//! builders and TOC parsers give errors (or a partial index), never a panic or a hang.

use std::io::Write;

use regfs::layer::zstd::FrameIndexer;
use regfs::layer::{gzip, toc, Codec, LayerIndex};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn sample_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..20 {
        let data = vec![i as u8; 700 * i];
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, format!("dir{}/file{i}", i % 3), &data[..])
            .unwrap();
    }
    b.into_inner().unwrap()
}

fn gz(d: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(d).unwrap();
    e.finish().unwrap()
}

/// Feed `data` to every builder; only the absence of panics is asserted.
fn feed(data: &[u8]) {
    let _ = LayerIndex::build(data);
    if let Ok(ix) = gzip::Indexer::new(data, 4096) {
        let _ = LayerIndex::build(ix);
    }
    let _ = LayerIndex::build(FrameIndexer::new(data, 4096));
    let _ = toc::index_from_toc(data, Codec::Gzip, data.len() as u64);
    let _ = toc::estargz_toc_json(data);
    let _ = toc::zstd_chunked_toc_json(data);
    if data.len() >= 51 {
        let _ = toc::estargz_toc_offset(&data[data.len() - 51..]);
    }
    if data.len() >= 64 {
        let _ = toc::zstd_chunked_toc(None, Some(&data[data.len() - 64..]));
    }
}

#[test]
fn random_truncated_and_flipped_inputs_never_panic() {
    let tar = sample_tar();
    let valid = [
        tar.clone(),
        gz(&tar),
        zstd::encode_all(&tar[..], 3).unwrap(),
    ];
    let mut rng = Rng(0x5eed);
    for round in 0..300 {
        // Pure noise, sometimes with a real magic number in front.
        let n = (rng.next() % 5000) as usize;
        let mut noise = rng.bytes(n);
        let magic: &[u8] = match round % 3 {
            0 => &[0x1f, 0x8b, 8, 0],
            1 => &[0x28, 0xb5, 0x2f, 0xfd],
            _ => &[],
        };
        noise.splice(0..0, magic.iter().copied());
        feed(&noise);
        for v in &valid {
            // Truncated.
            let cut = (rng.next() as usize) % v.len();
            feed(&v[..cut]);
            // Bit-flipped.
            let mut f = v.clone();
            for _ in 0..1 + rng.next() % 4 {
                let i = (rng.next() as usize) % f.len();
                f[i] ^= 1 << (rng.next() % 8);
            }
            feed(&f);
        }
    }
    // Valid inputs index fully.
    assert_eq!(LayerIndex::build(&tar[..]).unwrap().dirs[""].len(), 3);
    assert!(LayerIndex::build(gzip::Indexer::new(&valid[1][..], 4096).unwrap()).is_ok());
    assert!(LayerIndex::build(FrameIndexer::new(&valid[2][..], 4096)).is_ok());
}

#[test]
fn truncated_compressed_layers_are_errors() {
    let tar = sample_tar();
    let g = gz(&tar);
    let z = zstd::encode_all(&tar[..], 3).unwrap();
    for cut in [10, g.len() / 3, g.len() / 2, g.len() - 9] {
        let r = gzip::Indexer::new(&g[..cut], 4096).and_then(|ix| {
            let mut ix = ix;
            std::io::copy(&mut ix, &mut std::io::sink())
        });
        assert!(r.is_err(), "gzip cut at {cut}");
    }
    for cut in [10, z.len() / 2, z.len() - 3] {
        let r = std::io::copy(
            &mut FrameIndexer::new(&z[..cut], 4096),
            &mut std::io::sink(),
        );
        assert!(r.is_err(), "zstd cut at {cut}");
    }
}
