//! Sparse checkpoint windows: of the 32 KiB of output before a gzip anchor, only the bytes
//! that the deflate stream after it copies (its back-references reach at most 32 KiB back, so
//! only the first 32 KiB of output after the anchor can reach into the window) are needed to
//! resume there. The rest are stored as zeros, which the window file's raw-deflate compresses
//! to almost nothing; a decoder resuming at the anchor produces the same output with either
//! window, since it never reads the zeroed bytes.
//!
//! [`referenced`] finds those bytes with a small deflate decoder of its own (zlib does not say
//! where its copies come from), used by the indexer only. It is checked against the output the
//! indexer's zlib produced: on any disagreement, error or shortfall it answers `None` and the
//! indexer keeps the whole window, so a mistake here can cost bytes, never a wrong span (and
//! every span is verified by digest when read in any case).
//!
//! Bounds: it reads only the input it is given, builds tables of at most 2^15 entries, and
//! produces at most `expect.len()` plus one match (258 bytes) of output.

/// Largest deflate code length.
const MAX_BITS: usize = 15;

/// Base lengths and extra bits of length symbols 257..=285.
const LEN_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LEN_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
/// Base distances and extra bits of distance symbols 0..=29.
const DIST_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
const DIST_EXTRA: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];
/// The order in which code length code lengths are sent.
const CL_ORDER: [usize; 19] = [
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
];

/// Which bytes of `window` (the output before a checkpoint) the deflate stream in `input`
/// copies while producing `expect` (the output after the checkpoint, as the indexer's zlib
/// produced it; at most one window's worth is useful). `input` starts at the checkpoint:
/// with `bits` > 0 its first byte's top `bits` bits are the stream's first bits. `None` when
/// the stream cannot be followed or disagrees with `expect`.
pub fn referenced(window: &[u8], input: &[u8], bits: u8, expect: &[u8]) -> Option<Vec<bool>> {
    let mut r = Bits::new(input, bits)?;
    let mut d = Decoder {
        window,
        used: vec![false; window.len()],
        out: Vec::with_capacity(expect.len() + 258),
        limit: expect.len(),
    };
    loop {
        let last = r.take(1)? == 1;
        match r.take(2)? {
            0 => d.stored(&mut r)?,
            1 => d.codes(&mut r, &Table::fixed_lit(), &Table::fixed_dist())?,
            2 => {
                let (lit, dist) = dynamic_tables(&mut r)?;
                d.codes(&mut r, &lit, &dist)?;
            }
            _ => return None,
        }
        if d.out.len() >= d.limit {
            break;
        }
        if last {
            // The member ends: output after it (a new member) refers to no window.
            break;
        }
    }
    let n = d.out.len().min(expect.len());
    (d.out[..n] == expect[..n]).then_some(d.used)
}

/// `window` with the bytes not in `used` zeroed.
pub fn sparse(window: &[u8], used: &[bool]) -> Vec<u8> {
    window
        .iter()
        .zip(used)
        .map(|(&b, &u)| if u { b } else { 0 })
        .collect()
}

/// An LSB-first bit reader over a byte slice.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    buf: u64,
    cnt: u32,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8], bits: u8) -> Option<Bits<'a>> {
        let mut r = Bits {
            data,
            pos: 0,
            buf: 0,
            cnt: 0,
        };
        if bits > 0 {
            let first = *data.first()?;
            r.buf = u64::from(first >> (8 - bits));
            r.cnt = u32::from(bits);
            r.pos = 1;
        }
        Some(r)
    }

    /// Tops the buffer up with whole bytes while there are any (up to 56 bits).
    fn refill(&mut self) {
        while self.cnt <= 48 && self.pos < self.data.len() {
            self.buf |= u64::from(self.data[self.pos]) << self.cnt;
            self.pos += 1;
            self.cnt += 8;
        }
    }

    fn take(&mut self, n: u32) -> Option<u32> {
        if n == 0 {
            return Some(0);
        }
        if self.cnt < n {
            self.refill();
            if self.cnt < n {
                return None;
            }
        }
        let v = (self.buf & ((1u64 << n) - 1)) as u32;
        self.buf >>= n;
        self.cnt -= n;
        Some(v)
    }

    /// Drops the bits left of the current byte (before a stored block).
    fn align(&mut self) {
        let r = self.cnt % 8;
        self.buf >>= r;
        self.cnt -= r;
    }
}

/// A canonical Huffman code as a lookup table indexed by the next `bits` input bits.
struct Table {
    bits: u32,
    /// (symbol, code length); length 0: no code there.
    entries: Vec<(u16, u8)>,
}

impl Table {
    /// The table of a code given by each symbol's code length (0: unused). `None` for a set
    /// of lengths that is over-subscribed.
    fn new(lengths: &[u8]) -> Option<Table> {
        let max = lengths.iter().copied().max().unwrap_or(0) as usize;
        if max == 0 {
            return Some(Table {
                bits: 1,
                entries: vec![(0, 0); 2],
            });
        }
        let mut count = [0u32; MAX_BITS + 1];
        for &l in lengths {
            count[l as usize] += 1;
        }
        count[0] = 0;
        let mut next = [0u32; MAX_BITS + 2];
        let mut code = 0u32;
        let mut left = 1i64;
        for len in 1..=MAX_BITS {
            left = left * 2 - i64::from(count[len]);
            if left < 0 {
                return None;
            }
            code = (code + count[len - 1]) << 1;
            next[len] = code;
        }
        let bits = max as u32;
        let mut entries = vec![(0u16, 0u8); 1 << bits];
        for (sym, &l) in lengths.iter().enumerate() {
            if l == 0 {
                continue;
            }
            let c = next[l as usize];
            next[l as usize] += 1;
            let rev = (c.reverse_bits() >> (32 - u32::from(l))) as usize;
            let mut i = rev;
            while i < entries.len() {
                entries[i] = (sym as u16, l);
                i += 1 << l;
            }
        }
        Some(Table { bits, entries })
    }

    fn fixed_lit() -> Table {
        let mut l = [0u8; 288];
        l[..144].fill(8);
        l[144..256].fill(9);
        l[256..280].fill(7);
        l[280..].fill(8);
        Table::new(&l).expect("the fixed code is complete")
    }

    fn fixed_dist() -> Table {
        Table::new(&[5u8; 30]).expect("the fixed code is complete")
    }

    fn decode(&self, r: &mut Bits<'_>) -> Option<u16> {
        if r.cnt < self.bits {
            r.refill();
        }
        // Near the end of the input fewer bits than the table's may remain: the code found
        // must fit in those.
        let have = r.cnt.min(self.bits);
        let peek = (r.buf & ((1u64 << self.bits) - 1)) as usize;
        let (sym, len) = self.entries[peek];
        if len == 0 || u32::from(len) > have {
            return None;
        }
        r.buf >>= len;
        r.cnt -= u32::from(len);
        Some(sym)
    }
}

/// Reads a dynamic block's code definitions.
fn dynamic_tables(r: &mut Bits<'_>) -> Option<(Table, Table)> {
    let nlen = r.take(5)? as usize + 257;
    let ndist = r.take(5)? as usize + 1;
    let ncode = r.take(4)? as usize + 4;
    if nlen > 286 || ndist > 30 {
        return None;
    }
    let mut cl = [0u8; 19];
    for &i in &CL_ORDER[..ncode] {
        cl[i] = r.take(3)? as u8;
    }
    let cl = Table::new(&cl)?;
    let mut lengths = vec![0u8; nlen + ndist];
    let mut i = 0;
    while i < lengths.len() {
        let sym = cl.decode(r)?;
        let (value, repeat) = match sym {
            0..=15 => (sym as u8, 1),
            16 => (*lengths.get(i.checked_sub(1)?)?, 3 + r.take(2)? as usize),
            17 => (0, 3 + r.take(3)? as usize),
            18 => (0, 11 + r.take(7)? as usize),
            _ => return None,
        };
        if i + repeat > lengths.len() {
            return None;
        }
        lengths[i..i + repeat].fill(value);
        i += repeat;
    }
    if lengths[256] == 0 {
        return None; // no end-of-block code
    }
    Some((Table::new(&lengths[..nlen])?, Table::new(&lengths[nlen..])?))
}

struct Decoder<'w> {
    window: &'w [u8],
    used: Vec<bool>,
    out: Vec<u8>,
    limit: usize,
}

impl Decoder<'_> {
    fn stored(&mut self, r: &mut Bits<'_>) -> Option<()> {
        r.align();
        let len = r.take(16)?;
        let nlen = r.take(16)?;
        if len != !nlen & 0xffff {
            return None;
        }
        for _ in 0..len {
            self.out.push(r.take(8)? as u8);
        }
        Some(())
    }

    /// Decodes one block's symbols, up to its end or past the output limit.
    fn codes(&mut self, r: &mut Bits<'_>, lit: &Table, dist: &Table) -> Option<()> {
        loop {
            if self.out.len() >= self.limit {
                return Some(());
            }
            let sym = lit.decode(r)? as usize;
            if sym < 256 {
                self.out.push(sym as u8);
                continue;
            }
            if sym == 256 {
                return Some(());
            }
            let s = sym - 257;
            let len = usize::from(*LEN_BASE.get(s)?) + r.take(u32::from(LEN_EXTRA[s]))? as usize;
            let ds = dist.decode(r)? as usize;
            let back =
                usize::from(*DIST_BASE.get(ds)?) + r.take(u32::from(DIST_EXTRA[ds]))? as usize;
            let w = self.window.len();
            if back > self.out.len() + w {
                return None; // reaches before the window
            }
            // Source position in window ++ out coordinates.
            let start = w + self.out.len() - back;
            for k in 0..len {
                let at = start + k;
                let byte = if at < w {
                    self.used[at] = true;
                    self.window[at]
                } else {
                    self.out[at - w]
                };
                self.out.push(byte);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn raw_deflate(data: &[u8], level: u32) -> Vec<u8> {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(level));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn sample(n: usize, seed: u64) -> Vec<u8> {
        // Text-like with repeats, some noise: exercises literals, matches and all block kinds.
        let words = [
            "import ",
            "numpy",
            " as np\n",
            "def ",
            "(self, x):\n",
            "    return ",
            "None",
            "\x00\x01\x02",
            "lib",
            ".so.6",
            "PyObject",
            "\n",
        ];
        let mut s = seed;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if s >> 60 == 0 {
                out.push((s >> 32) as u8);
            } else {
                out.extend_from_slice(words[(s >> 33) as usize % words.len()].as_bytes());
            }
        }
        out.truncate(n);
        out
    }

    #[test]
    fn decodes_whole_streams_at_every_level() {
        for level in [0, 1, 3, 6, 9] {
            let data = sample(100_000, level.into());
            let z = raw_deflate(&data, level);
            let used = referenced(&[], &z, 0, &data).expect("followed");
            assert!(used.is_empty());
        }
    }

    #[test]
    fn a_sparse_window_resumes_a_stream_as_the_whole_one_does() {
        // One stream, flushed to a byte boundary (a sync flush keeps the history) after the
        // first 32 KiB: the place of a checkpoint, whose window those 32 KiB are.
        let window = sample(32 * 1024, 7);
        let after = [&window[1000..9000], &sample(60_000, 8)[..]].concat();
        let mut c = flate2::Compress::new(flate2::Compression::new(6), false);
        let mut z = Vec::with_capacity(200_000);
        c.compress_vec(&window, &mut z, flate2::FlushCompress::Sync)
            .unwrap();
        let at = z.len();
        c.compress_vec(&after, &mut z, flate2::FlushCompress::Finish)
            .unwrap();
        let z = &z[at..];
        let expect = &after[..32 * 1024];
        let used = referenced(&window, z, 0, expect).expect("followed");
        let n = used.iter().filter(|u| **u).count();
        assert!(n > 0 && n < window.len(), "{n} bytes referenced");
        // Decoding with the sparse window gives the same output.
        let sparse = sparse(&window, &used);
        let checkpoint = crate::layer::gzip::Checkpoint {
            in_offset: 0,
            bits: 0,
            out_offset: window.len() as u64,
            window_at: 0,
            window_len: 1,
            light: false,
        };
        let out = crate::layer::gzip::decode_span(&checkpoint, &sparse, z, after.len()).unwrap();
        assert_eq!(out, after);
        // The whole window, zeroed where it is not used: other bytes there change nothing.
        assert_ne!(sparse, window);
        // And a disagreeing expectation, or a stream cut short, is refused.
        let mut wrong = expect.to_vec();
        wrong[100] ^= 1;
        assert!(referenced(&window, z, 0, &wrong).is_none());
        assert!(referenced(&window, &z[..50], 0, expect).is_none());
    }

    #[test]
    fn garbage_is_refused_not_followed() {
        let mut s = 1u64;
        for _ in 0..200 {
            let junk: Vec<u8> = (0..512)
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (s >> 56) as u8
                })
                .collect();
            let expect = vec![0u8; 4096];
            let _ = referenced(&[1u8; 100], &junk, (s % 8) as u8, &expect);
        }
    }
}
