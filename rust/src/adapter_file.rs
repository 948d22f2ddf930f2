//! An adapter's weights file, read once and copied straight into the slots that serve it.
//!
//! The loader used to build a torch tensor per weight (240 for a rank-8 adapter on q/k/v/o of
//! a 30-layer model), check, scale and copy each from Python: ~7 ms of CPU a read, most of it
//! with the GIL held beside the step thread. Here the file is read into one buffer, its
//! header parsed and checked by the `safetensors` crate, and every floating-point weight's
//! largest magnitude measured in the same read (NaN when it holds a NaN), so the Python side
//! validates the adapter from the header alone. A fill then converts, scales and (for B)
//! transposes each weight into its place in a slot, without the GIL.

use std::fmt;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

/// The longest header read (safetensors' own bound).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

use half::{bf16, f16};
use parking_lot::Mutex;
use safetensors::tensor::{Dtype, Metadata, SafeTensors};

use crate::confined::{open_beneath, Resolve};

/// Why a file could not be read as safetensors.
#[derive(Debug)]
pub enum ReadError {
    Io(std::io::Error),
    Format(String),
    /// The path could not be opened beneath its root (it leads out, or does not exist).
    Refused(String),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::Format(e) => write!(f, "not a safetensors file ({e})"),
            Self::Refused(e) => write!(f, "{e}"),
        }
    }
}

/// One weight of the file: where its bytes lie in the buffer, and what they hold.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A weights file in memory: the bytes, its tensors in file order (shared by every file of
/// the same header), and the largest magnitude measured in each.
pub struct AdapterFile {
    bytes: Vec<u8>,
    header_end: usize,
    entries: Arc<[Entry]>,
    maxes: Vec<Option<f32>>,
}

/// The element type of a destination slot (`lora_dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotDtype {
    F32,
    BF16,
    F16,
}

impl SlotDtype {
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::BF16 | Self::F16 => 2,
        }
    }
}

/// One weight into one destination: `rows x cols` values (the weight's shape, or its
/// transpose with `transpose`), row i at `offset + i * stride` (in elements), each multiplied
/// by `scale` (in float32) and rounded to the destination's type.
#[derive(Clone, Copy, Debug)]
pub struct WeightCopy {
    pub tensor: usize,
    pub dst: usize,
    pub offset: usize,
    pub stride: usize,
    pub transpose: bool,
    pub scale: f32,
}

impl AdapterFile {
    /// Reads `path` as untrusted input: opened without blocking (a FIFO answers at once),
    /// then read as [`AdapterFile::from_file`] does.
    pub fn read(path: &Path) -> Result<Self, ReadError> {
        use std::os::unix::fs::OpenOptionsExt;

        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(ReadError::Io)?;
        Self::from_file(file, &path.display().to_string())
    }

    /// Reads `rel` beneath the folder `root`, never following a link out of it
    /// ([`crate::confined::open_beneath`]), as [`AdapterFile::from_file`] does.
    pub fn read_beneath(root: &Path, rel: &Path, how: Resolve) -> Result<Self, ReadError> {
        let file = open_beneath(root, rel, how).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ReadError::Io(e),
            _ => ReadError::Refused(crate::confined::describe(&e)),
        })?;
        Self::from_file(file, &rel.display().to_string())
    }

    /// Reads an open file as untrusted input: refused unless a regular file, its header read
    /// and checked against the file's size before any data is read, and never read past what
    /// the header declares.
    pub fn from_file(mut file: File, name: &str) -> Result<Self, ReadError> {
        use std::io::Read;

        let meta = file.metadata().map_err(ReadError::Io)?;
        if !meta.is_file() {
            return Err(ReadError::Format(format!("{name} is not a regular file")));
        }
        let size = meta.len();
        let mut len8 = [0u8; 8];
        file.read_exact(&mut len8)
            .map_err(|_| ReadError::Format(format!("{size} bytes: no header")))?;
        let header_len = u64::from_le_bytes(len8);
        if header_len > MAX_HEADER_BYTES || 8 + header_len > size {
            return Err(ReadError::Format(format!(
                "the header claims {header_len} bytes of a {size}-byte file"
            )));
        }
        let header_end = 8 + header_len as usize;
        let mut header = vec![0u8; header_end];
        header[..8].copy_from_slice(&len8);
        file.read_exact(&mut header[8..]).map_err(ReadError::Io)?;
        let declared = match HEADERS.declared_end(&header) {
            Some(end) => end as u64, // a header seen before: no second parse
            None => {
                let metadata: Metadata = serde_json::from_slice(&header[8..])
                    .map_err(|e| ReadError::Format(format!("its header: {e}")))?;
                header_end as u64 + metadata.data_len() as u64
            }
        };
        if declared != size {
            return Err(ReadError::Format(format!(
                "its header declares {declared} bytes, the file holds {size}"
            )));
        }
        let mut bytes = Vec::with_capacity(declared as usize);
        bytes.extend_from_slice(&header);
        file.take(declared - header_end as u64)
            .read_to_end(&mut bytes)
            .map_err(ReadError::Io)?;
        if bytes.len() as u64 != declared {
            return Err(ReadError::Format(format!(
                "the file ended at {} of the {declared} bytes its header declares",
                bytes.len()
            )));
        }
        Self::from_bytes(bytes)
    }

    /// Parses a safetensors file held in memory, and measures each weight.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, ReadError> {
        let (header_end, entries) = match HEADERS.find(&bytes) {
            Some(found) => found,
            None => {
                let (header_len, metadata) = SafeTensors::read_metadata(&bytes)
                    .map_err(|e| ReadError::Format(e.to_string()))?;
                let header_end = 8 + header_len;
                let entries = entries_of(&metadata, header_end);
                HEADERS.insert(&bytes[..header_end], &entries);
                (header_end, entries)
            }
        };
        let maxes = entries
            .iter()
            .map(|e| max_abs(e.dtype, &bytes[e.start..e.end]))
            .collect();
        Ok(Self {
            bytes,
            header_end,
            entries,
            maxes,
        })
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Per entry, the largest magnitude over its values as float32 (NaN if any is NaN;
    /// infinite if any is, or a float64 beyond float32's range); `None` for a dtype that is
    /// not F64, F32, F16 or BF16.
    pub fn max_abs(&self) -> &[Option<f32>] {
        &self.maxes
    }

    /// The header (its JSON): names, dtypes, shapes and offsets. Files that share it share
    /// a layout, which the loader validates once.
    pub fn header(&self) -> &[u8] {
        &self.bytes[8..self.header_end]
    }

    /// The file's bytes (a copy of them is what `weights` in Python is built from).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Performs `copies` into `dsts` (each the bytes of one slot's region of a stacked
    /// tensor, of type `dtype`). Every copy is checked first: a floating-point 2-D weight, a
    /// destination that exists, and rows that fit inside it without overlapping; nothing is
    /// written when one fails.
    pub fn fill(
        &self,
        dsts: &mut [&mut [u8]],
        dtype: SlotDtype,
        copies: &[WeightCopy],
    ) -> Result<(), String> {
        for c in copies {
            self.check(dsts, dtype, c)?;
        }
        for c in copies {
            let e = &self.entries[c.tensor];
            let src = &self.bytes[e.start..e.end];
            let dst = &mut *dsts[c.dst];
            match e.dtype {
                Dtype::F32 if place_streamed(src, dst, dtype, e, c) => {}
                Dtype::F32 => copy_as::<4>(src, dst, dtype, e, c, f32::from_le_bytes),
                Dtype::F64 => copy_as::<8>(src, dst, dtype, e, c, |b| f64::from_le_bytes(b) as f32),
                Dtype::BF16 => {
                    copy_as::<2>(src, dst, dtype, e, c, |b| bf16::from_le_bytes(b).to_f32())
                }
                Dtype::F16 => {
                    copy_as::<2>(src, dst, dtype, e, c, |b| f16::from_le_bytes(b).to_f32())
                }
                _ => unreachable!("checked: a floating-point weight"),
            }
        }
        Ok(())
    }

    fn check(&self, dsts: &[&mut [u8]], dtype: SlotDtype, c: &WeightCopy) -> Result<(), String> {
        let e = self
            .entries
            .get(c.tensor)
            .ok_or_else(|| format!("no tensor {}", c.tensor))?;
        if self.maxes[c.tensor].is_none() || e.shape.len() != 2 {
            return Err(format!("{}: not a floating-point matrix", e.name));
        }
        let (rows, cols) = match c.transpose {
            false => (e.shape[0], e.shape[1]),
            true => (e.shape[1], e.shape[0]),
        };
        let dst = dsts
            .get(c.dst)
            .ok_or_else(|| format!("{}: no destination {}", e.name, c.dst))?;
        let capacity = dst.len() / dtype.size();
        let end = match rows {
            0 => Some(c.offset),
            _ => (rows - 1)
                .checked_mul(c.stride)
                .and_then(|n| n.checked_add(c.offset))
                .and_then(|n| n.checked_add(cols)),
        };
        if (rows > 1 && cols > c.stride) || end.is_none_or(|end| end > capacity) {
            return Err(format!(
                "{}: {rows} x {cols} at offset {} (stride {}) does not fit a destination of {capacity}",
                e.name, c.offset, c.stride
            ));
        }
        Ok(())
    }
}

/// Headers parsed before, by their bytes. Adapters trained with one recipe share a header
/// byte for byte, and its parse (JSON through serde's flattened map, then the offsets
/// checked) took 0.2 ms of a 240-weight file's 0.74 ms read. A header found here parsed
/// before into these tensors, so the file parses as `read_metadata` would parse it, once its
/// length is the one the header gives (checked on every file).
struct HeaderCache(Mutex<Vec<Parsed>>);

/// A header's bytes (its length first) and its tensors.
type Parsed = (Box<[u8]>, Arc<[Entry]>);

static HEADERS: HeaderCache = HeaderCache(Mutex::new(Vec::new()));

/// The headers kept (the latest parsed), and the longest kept: a few recipes' worth, bounded.
const CACHED_HEADERS: usize = 16;
const MAX_CACHED_HEADER: usize = 1 << 20;

impl HeaderCache {
    /// `bytes`' header end and tensors, when its header (the header's length, then the
    /// header) was parsed before and the data after it has the length that header gives.
    fn find(&self, bytes: &[u8]) -> Option<(usize, Arc<[Entry]>)> {
        let n = u64::from_le_bytes(bytes.get(..8)?.try_into().unwrap());
        let header_end = usize::try_from(n).ok()?.checked_add(8)?;
        let header = bytes.get(..header_end)?;
        let entries = {
            let cached = self.0.lock();
            cached.iter().find(|(h, _)| **h == *header)?.1.clone()
        };
        (data_end(&entries, header_end) == bytes.len()).then_some((header_end, entries))
    }

    /// Where the data of a file with this header (its length first, then the header) ends,
    /// when the header was parsed before.
    fn declared_end(&self, header: &[u8]) -> Option<usize> {
        let cached = self.0.lock();
        let (_, entries) = cached.iter().find(|(h, _)| **h == *header)?;
        Some(data_end(entries, header.len()))
    }

    fn insert(&self, header: &[u8], entries: &Arc<[Entry]>) {
        if header.len() > MAX_CACHED_HEADER {
            return;
        }
        let mut cached = self.0.lock();
        if cached.len() >= CACHED_HEADERS {
            cached.remove(0);
        }
        cached.push((header.into(), entries.clone()));
    }
}

/// Where the data of a file of these tensors ends (its length).
fn data_end(entries: &[Entry], header_end: usize) -> usize {
    entries.iter().map(|e| e.end).max().unwrap_or(header_end)
}

/// The tensors a header describes, sorted by where their bytes lie (then by name: one order
/// for every parse of a header, empty tensors included).
fn entries_of(metadata: &Metadata, data_start: usize) -> Arc<[Entry]> {
    let mut entries: Vec<Entry> = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| Entry {
            name,
            dtype: info.dtype,
            shape: info.shape.clone(),
            start: data_start + info.data_offsets.0,
            end: data_start + info.data_offsets.1,
        })
        .collect();
    entries.sort_by(|a, b| (a.start, a.end, &a.name).cmp(&(b.start, b.end, &b.name)));
    entries.into()
}

/// One weight, values of N bytes read by `load`, into `dst` as the copy places it.
fn copy_as<const N: usize>(
    src: &[u8],
    dst: &mut [u8],
    dtype: SlotDtype,
    e: &Entry,
    c: &WeightCopy,
    load: impl Fn([u8; N]) -> f32,
) {
    match dtype {
        SlotDtype::F32 => place(src, dst, e, c, load, f32::to_ne_bytes),
        SlotDtype::BF16 => place(src, dst, e, c, load, |v| bf16::from_f32(v).to_ne_bytes()),
        SlotDtype::F16 => place(src, dst, e, c, load, |v| f16::from_f32(v).to_ne_bytes()),
    }
}

/// Reads the weight row by row, each value scaled and stored as M bytes. A weight kept as it
/// is (A) copies each row into a destination row, with no bounds check per value, so the
/// loop vectorizes (a rank-8 adapter's slot copy: 0.58 -> 0.47 ms); a transposed one (B)
/// writes each source row down a destination column, which at LoRA ranks stays in L1.
fn place<const N: usize, const M: usize>(
    src: &[u8],
    dst: &mut [u8],
    e: &Entry,
    c: &WeightCopy,
    load: impl Fn([u8; N]) -> f32,
    store: impl Fn(f32) -> [u8; M],
) {
    let (rows, cols) = (e.shape[0], e.shape[1]);
    if rows == 0 || cols == 0 {
        return;
    }
    let value = |b: &[u8]| store(load(b.try_into().unwrap()) * c.scale);
    for (i, row) in src.chunks_exact(cols * N).take(rows).enumerate() {
        if c.transpose {
            for (j, v) in row.chunks_exact(N).enumerate() {
                let at = (c.offset + j * c.stride + i) * M;
                dst[at..at + M].copy_from_slice(&value(v));
            }
        } else {
            let at = (c.offset + i * c.stride) * M;
            let out = dst[at..at + cols * M].chunks_exact_mut(M);
            for (d, v) in out.zip(row.chunks_exact(N)) {
                d.copy_from_slice(&value(v));
            }
        }
    }
}

/// A float32 weight into float32 or bfloat16 slots, whole cache lines at a time with
/// non-temporal stores: a host slot is written once and read later, by then out of the cache,
/// and a store that allocates its line reads the line from memory first (the slots are far
/// larger than the cache), doubling the traffic. A (rows kept) goes row by row; B
/// (transposed) a line's worth of source rows at a time (16 in float32, 32 in bfloat16), so
/// each destination line is written whole by four consecutive stores. Where the
/// destination's lines do not line up with the weight's rows (alignment, lengths not a
/// multiple of a line), nothing is written and `false` sends the copy to `place`.
/// bfloat16 rounds as `place` does (to nearest, ties to even; a NaN stays a NaN): a rank-8
/// adapter's slot copy (`LoRASlots.load`, bfloat16 slots) 0.82 -> 0.49 ms.
#[cfg(target_arch = "x86_64")]
fn place_streamed(src: &[u8], dst: &mut [u8], dtype: SlotDtype, e: &Entry, c: &WeightCopy) -> bool {
    match dtype {
        SlotDtype::F32 => streamed::stream_as::<streamed::F32Lines>(src, dst, e, c),
        SlotDtype::BF16 => streamed::stream_as::<streamed::Bf16Lines>(src, dst, e, c),
        SlotDtype::F16 => false,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn place_streamed(_: &[u8], _: &mut [u8], _: SlotDtype, _: &Entry, _: &WeightCopy) -> bool {
    false
}

/// The streamed copy's slot types and its loop (x86-64: SSE2 stores that bypass the cache).
#[cfg(target_arch = "x86_64")]
mod streamed {
    use super::{Entry, WeightCopy};
    use std::arch::x86_64::__m128;

    /// A slot type written 16 bytes a store: `PER_STORE` float32 values (scaled), given as
    /// `PER_STORE / 4` vectors of four.
    pub(super) trait StreamedType {
        const SIZE: usize;
        const PER_STORE: usize;
        /// SAFETY: `p` is 16-byte aligned, with 16 writable bytes.
        unsafe fn put(p: *mut u8, v: &[__m128]);
    }

    pub(super) struct F32Lines;

    impl StreamedType for F32Lines {
        const SIZE: usize = 4;
        const PER_STORE: usize = 4;
        unsafe fn put(p: *mut u8, v: &[__m128]) {
            std::arch::x86_64::_mm_stream_ps(p.cast::<f32>(), v[0]);
        }
    }

    pub(super) struct Bf16Lines;

    impl StreamedType for Bf16Lines {
        const SIZE: usize = 2;
        const PER_STORE: usize = 8;
        unsafe fn put(p: *mut u8, v: &[__m128]) {
            use std::arch::x86_64::*;
            // each lane's top 16 bits after rounding (x + 0x7fff + the kept part's lowest bit:
            // a carry into bit 16 exactly when the dropped half is over a tie, or a tie over an
            // odd value); a NaN keeps its top bits as they are (the scaling multiply has made it
            // quiet, so they are a NaN too). The arithmetic shift leaves the 16 bits
            // sign-extended, which the signed pack keeps as they are.
            let half = |x: __m128| {
                let bits = _mm_castps_si128(x);
                let odd = _mm_and_si128(_mm_srli_epi32::<16>(bits), _mm_set1_epi32(1));
                let rounded = _mm_add_epi32(_mm_add_epi32(bits, _mm_set1_epi32(0x7fff)), odd);
                let nan = _mm_castps_si128(_mm_cmpunord_ps(x, x));
                let chosen = _mm_or_si128(_mm_and_si128(nan, bits), _mm_andnot_si128(nan, rounded));
                _mm_srai_epi32::<16>(chosen)
            };
            _mm_stream_si128(p.cast::<__m128i>(), _mm_packs_epi32(half(v[0]), half(v[1])));
        }
    }

    pub(super) fn stream_as<T: StreamedType>(
        src: &[u8],
        dst: &mut [u8],
        e: &Entry,
        c: &WeightCopy,
    ) -> bool {
        use std::arch::x86_64::{_mm_loadu_ps, _mm_mul_ps, _mm_set1_ps, _mm_set_ps};
        use std::arch::x86_64::{_mm_setzero_ps, _mm_sfence};
        let line = 64 / T::SIZE; // values in a 64-byte line
        let (rows, cols) = (e.shape[0], e.shape[1]);
        let run = if c.transpose { rows } else { cols }; // contiguous values in the destination
        let lined = |at: usize| (dst.as_ptr() as usize + T::SIZE * at).is_multiple_of(64);
        if rows == 0
            || cols == 0
            || src.len() < 4 * rows * cols
            || !run.is_multiple_of(line)
            || !c.stride.is_multiple_of(line)
            || !lined(c.offset)
        {
            return false;
        }
        // SAFETY: SSE2 is part of x86-64. Every store is inside `dst`: `check` proved the copy's
        // rows fit, and each store covers PER_STORE values of one of them; 16-byte alignment
        // follows from the line alignment checked above. Loads are unaligned and inside `src` rows.
        unsafe {
            let scale = _mm_set1_ps(c.scale);
            let (base, len) = (dst.as_mut_ptr(), dst.len());
            let at = |r: usize, k: usize| {
                let byte = T::SIZE * (c.offset + r * c.stride + k);
                debug_assert!(byte + 16 <= len);
                base.add(byte)
            };
            let value = |i: usize, j: usize| {
                f32::from_le_bytes(src[4 * (i * cols + j)..][..4].try_into().unwrap())
            };
            let mut v = [_mm_setzero_ps(); 2];
            let fours = T::PER_STORE / 4;
            if !c.transpose {
                for (i, row) in src.chunks_exact(4 * cols).take(rows).enumerate() {
                    for (k, chunk) in row.chunks_exact(4 * T::PER_STORE).enumerate() {
                        for (q, x) in v[..fours].iter_mut().enumerate() {
                            let four = _mm_loadu_ps(chunk[16 * q..].as_ptr().cast::<f32>());
                            *x = _mm_mul_ps(four, scale);
                        }
                        T::put(at(i, T::PER_STORE * k), &v);
                    }
                }
            } else {
                for i0 in (0..rows).step_by(line) {
                    for j in 0..cols {
                        for s in 0..line / T::PER_STORE {
                            let i = i0 + T::PER_STORE * s;
                            for (q, x) in v[..fours].iter_mut().enumerate() {
                                let r = i + 4 * q;
                                let four: __m128 = _mm_set_ps(
                                    value(r + 3, j),
                                    value(r + 2, j),
                                    value(r + 1, j),
                                    value(r, j),
                                );
                                *x = _mm_mul_ps(four, scale);
                            }
                            T::put(at(j, i), &v);
                        }
                    }
                }
            }
            _mm_sfence(); // the streamed lines are visible before the slot is handed out
        }
        true
    }
}

/// The largest magnitude as float32, NaN if any value is NaN; `None` for a dtype that is not
/// a float of 16, 32 or 64 bits. Computed on the bits: with the sign cleared, a float's bits
/// order as its magnitude does, NaNs above infinity, so one integer max answers both.
fn max_abs(dtype: Dtype, src: &[u8]) -> Option<f32> {
    Some(match dtype {
        Dtype::F32 => f32::from_bits(max_bits::<4, u32>(src, 0x7fff_ffff)), // NaN above inf
        Dtype::BF16 => bf16::from_bits(max_bits::<2, u16>(src, 0x7fff)).to_f32(),
        Dtype::F16 => f16::from_bits(max_bits::<2, u16>(src, 0x7fff)).to_f32(),
        Dtype::F64 => f64::from_bits(max_bits::<8, u64>(src, 0x7fff_ffff_ffff_ffff)) as f32,
        _ => return None,
    })
}

/// The largest of `src`'s little-endian N-byte values, each masked by `mask`. Runs over 16
/// independent lanes so the compiler keeps them in vector registers: one running max over
/// the whole weight was a serial chain: a 3.7 MB adapter's read took 1.1 ms, now 0.64 ms.
fn max_bits<const N: usize, T: Bits<N>>(src: &[u8], mask: T) -> T {
    const LANES: usize = 16;
    let mut lanes = [T::default(); LANES];
    let mut blocks = src.chunks_exact(N * LANES);
    for block in &mut blocks {
        for (lane, b) in lanes.iter_mut().zip(block.chunks_exact(N)) {
            *lane = (*lane).max(T::from_le(b.try_into().unwrap()) & mask);
        }
    }
    let rest = blocks.remainder().chunks_exact(N);
    let tail = rest.map(|b| T::from_le(b.try_into().unwrap()) & mask);
    lanes.into_iter().chain(tail).fold(T::default(), T::max)
}

/// The unsigned integers that hold a float's bits.
trait Bits<const N: usize>: Copy + Default + Ord + std::ops::BitAnd<Output = Self> {
    fn from_le(b: [u8; N]) -> Self;
}

impl Bits<2> for u16 {
    fn from_le(b: [u8; 2]) -> Self {
        u16::from_le_bytes(b)
    }
}

impl Bits<4> for u32 {
    fn from_le(b: [u8; 4]) -> Self {
        u32::from_le_bytes(b)
    }
}

impl Bits<8> for u64 {
    fn from_le(b: [u8; 8]) -> Self {
        u64::from_le_bytes(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::{serialize, TensorView};

    fn file(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> AdapterFile {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        AdapterFile::from_bytes(serialize(views, None).unwrap()).unwrap()
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn read_f32(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_ne_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn measures_each_weight_and_names_nan() {
        let f = file(&[
            ("a", Dtype::F32, vec![1, 3], f32_bytes(&[1.0, -4.0, 2.0])),
            ("b", Dtype::F32, vec![1, 2], f32_bytes(&[f32::NAN, 9.0])),
            ("i", Dtype::I64, vec![1], vec![0; 8]),
        ]);
        let by_name = |n: &str| {
            let i = f.entries().iter().position(|e| e.name == n).unwrap();
            f.max_abs()[i]
        };
        assert_eq!(by_name("a"), Some(4.0));
        assert!(by_name("b").unwrap().is_nan());
        assert_eq!(by_name("i"), None);
    }

    proptest::proptest! {
        /// The lane-wise max over the bits equals a plain max of the values' magnitudes, for
        /// any length (whole 16-value blocks and a remainder) and specials anywhere.
        #[test]
        fn max_abs_is_the_largest_magnitude(
            values in proptest::collection::vec(
                proptest::prop_oneof![
                    8 => -1e30f64..1e30,
                    1 => proptest::sample::select(vec![
                        f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0, 1e300, -1e-300,
                    ]),
                ],
                0..80,
            )
        ) {
            let f32s: Vec<f32> = values.iter().map(|&v| v as f32).collect();
            let expected = |v: &[f32]| {
                if v.iter().any(|x| x.is_nan()) {
                    f32::NAN
                } else {
                    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
                }
            };
            let same = |got: Option<f32>, want: f32| {
                got.is_some_and(|g| g == want || (g.is_nan() && want.is_nan()))
            };
            let le = |b: Vec<[u8; 2]>| b.concat();
            let bf16s: Vec<f32> = f32s.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
            let f16s: Vec<f32> = f32s.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
            let bf16_bytes = le(f32s.iter().map(|&v| bf16::from_f32(v).to_le_bytes()).collect());
            let f16_bytes = le(f32s.iter().map(|&v| f16::from_f32(v).to_le_bytes()).collect());
            let f64_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            proptest::prop_assert!(same(max_abs(Dtype::F32, &f32_bytes(&f32s)), expected(&f32s)));
            proptest::prop_assert!(same(max_abs(Dtype::BF16, &bf16_bytes), expected(&bf16s)));
            proptest::prop_assert!(same(max_abs(Dtype::F16, &f16_bytes), expected(&f16s)));
            proptest::prop_assert!(same(max_abs(Dtype::F64, &f64_bytes), expected(&f32s)));
        }
    }

    proptest::proptest! {
        /// Float32 into float32 slots, aligned (the streamed path, whole lines) or not (the
        /// plain one): every value lands scaled where the copy says, every other byte of the
        /// destination stays zero.
        #[test]
        fn float32_fills_place_every_value_and_nothing_else(
            rows_lines in 1usize..4,
            cols in proptest::prop_oneof![1usize..20, proptest::strategy::Just(16), proptest::strategy::Just(32)],
            transpose in proptest::bool::ANY,
            offset_lines in 0usize..3,
            misalign in proptest::prop_oneof![4 => proptest::strategy::Just(0usize), 1 => 1usize..16],
            extra_stride in 0usize..3,
            scale in -4.0f32..4.0,
            seed in 0u32..1000,
        ) {
            let rows = 16 * rows_lines; // a multiple of a line's 16 values either way
            let values: Vec<f32> = (0..rows * cols)
                .map(|k| (((k as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 100.0 - 5.0)
                .collect();
            let f = file(&[("w", Dtype::F32, vec![rows, cols], f32_bytes(&values))]);
            let (run, count) = if transpose { (rows, cols) } else { (cols, rows) };
            let stride = 16 * run.div_ceil(16) + 16 * extra_stride;
            let offset = 16 * offset_lines + misalign;
            let len = offset + stride * count + 16;
            // a destination starting on a 64-byte line, as a slot tensor does
            let mut buf = vec![0u8; 4 * len + 64];
            let skip = buf.as_ptr().align_offset(64);
            let dst = &mut buf[skip..skip + 4 * len];
            let copy = WeightCopy { tensor: 0, dst: 0, offset, stride, transpose, scale };
            f.fill(&mut [dst], SlotDtype::F32, &[copy]).unwrap();
            let got = read_f32(&buf[skip..skip + 4 * len]);
            let mut want = vec![0f32; len];
            for i in 0..rows {
                for j in 0..cols {
                    let at = if transpose { offset + j * stride + i } else { offset + i * stride + j };
                    want[at] = values[i * cols + j] * scale;
                }
            }
            proptest::prop_assert_eq!(got, want);
        }
    }

    /// The streamed path takes copies whose destination lines line up and leaves the rest
    /// (writing nothing) to `place`.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn streams_only_whole_aligned_lines() {
        let f = file(&[("w", Dtype::F32, vec![16, 8], f32_bytes(&[1.5; 128]))]);
        let e = &f.entries()[0];
        let src = &f.bytes()[e.start..e.end];
        let mut buf = vec![0u8; 4 * (16 * 8 + 16) + 64];
        let skip = buf.as_ptr().align_offset(64);
        let dst = &mut buf[skip..];
        let copy = |offset, transpose| WeightCopy {
            tensor: 0,
            dst: 0,
            offset,
            stride: 16,
            transpose,
            scale: 2.0,
        };
        let f32s = SlotDtype::F32;
        assert!(!place_streamed(src, dst, f32s, e, &copy(0, false))); // rows of 8: half a line
        assert!(!place_streamed(src, dst, f32s, e, &copy(4, true))); // not on a line
                                                                     // 16 bfloat16 values are half a line
        assert!(!place_streamed(
            src,
            dst,
            SlotDtype::BF16,
            e,
            &copy(16, true)
        ));
        assert!(dst.iter().all(|&b| b == 0));
        assert!(place_streamed(src, dst, f32s, e, &copy(16, true))); // 8 rows of 16, on lines
        assert!(read_f32(&dst[64..64 + 4 * 128]).iter().all(|&v| v == 3.0));
    }

    #[test]
    fn fills_rows_and_transposes_with_the_scale() {
        // a [2, 3]; b [3, 2] goes in transposed ([2, 3]) at stride 4, scaled by 2
        let f = file(&[
            (
                "a",
                Dtype::F32,
                vec![2, 3],
                f32_bytes(&[1., 2., 3., 4., 5., 6.]),
            ),
            (
                "b",
                Dtype::F32,
                vec![3, 2],
                f32_bytes(&[1., 2., 3., 4., 5., 6.]),
            ),
        ]);
        let (mut x, mut y) = (vec![0u8; 4 * 6], vec![0u8; 4 * 8]);
        let copies = [
            WeightCopy {
                tensor: 0,
                dst: 0,
                offset: 0,
                stride: 3,
                transpose: false,
                scale: 1.0,
            },
            WeightCopy {
                tensor: 1,
                dst: 1,
                offset: 1,
                stride: 4,
                transpose: true,
                scale: 2.0,
            },
        ];
        f.fill(&mut [&mut x, &mut y], SlotDtype::F32, &copies)
            .unwrap();
        assert_eq!(read_f32(&x), [1., 2., 3., 4., 5., 6.]);
        assert_eq!(read_f32(&y), [0., 2., 6., 10., 0., 4., 8., 12.]);
    }

    #[test]
    fn a_copy_that_does_not_fit_writes_nothing() {
        let f = file(&[("a", Dtype::F32, vec![2, 3], f32_bytes(&[1.; 6]))]);
        let mut x = vec![0u8; 4 * 6];
        let fits = WeightCopy {
            tensor: 0,
            dst: 0,
            offset: 0,
            stride: 3,
            transpose: false,
            scale: 1.,
        };
        for bad in [
            WeightCopy { offset: 1, ..fits },
            WeightCopy { stride: 2, ..fits },
            WeightCopy { dst: 1, ..fits },
            WeightCopy { tensor: 1, ..fits },
            WeightCopy {
                offset: usize::MAX,
                ..fits
            },
        ] {
            assert!(
                f.fill(&mut [&mut x], SlotDtype::F32, &[fits, bad]).is_err(),
                "{bad:?}"
            );
            assert!(x.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn rounds_to_half_types_as_torch_does() {
        // 1 + 2^-9 is halfway between two bfloat16 values: ties to even (down to 1.0)
        let v = 1.0 + 2f32.powi(-9);
        let f = file(&[("a", Dtype::F32, vec![1, 2], f32_bytes(&[v, -3.0]))]);
        let mut x = vec![0u8; 4];
        let c = WeightCopy {
            tensor: 0,
            dst: 0,
            offset: 0,
            stride: 2,
            transpose: false,
            scale: 1.,
        };
        f.fill(&mut [&mut x], SlotDtype::BF16, &[c]).unwrap();
        let got: Vec<f32> = x
            .chunks_exact(2)
            .map(|b| bf16::from_ne_bytes(b.try_into().unwrap()).to_f32())
            .collect();
        assert_eq!(got, [1.0, -3.0]);
    }

    #[test]
    fn a_corrupt_file_is_an_error() {
        assert!(matches!(
            AdapterFile::from_bytes(vec![1, 2, 3]),
            Err(ReadError::Format(_))
        ));
        let mut ok = file(&[("a", Dtype::F32, vec![1, 1], f32_bytes(&[1.0]))])
            .bytes
            .clone();
        ok.pop();
        assert!(matches!(
            AdapterFile::from_bytes(ok),
            Err(ReadError::Format(_))
        ));
    }

    #[test]
    fn a_read_checks_the_header_against_the_file_before_the_data() {
        let dir = std::env::temp_dir().join(format!("lp-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = file(&[(
            "a",
            Dtype::F32,
            vec![2, 2],
            f32_bytes(&[1.0, -2.0, 3.0, 4.0]),
        )]);
        let path = dir.join("w.safetensors");
        std::fs::write(&path, &good.bytes).unwrap();
        assert_eq!(AdapterFile::read(&path).unwrap().max_abs(), &[Some(4.0)]);
        let why = |r: Result<AdapterFile, ReadError>| match r {
            Err(ReadError::Format(e)) => e,
            other => panic!("{:?}", other.map(|f| f.bytes.len())),
        };
        let mut longer = good.bytes.clone(); // data past what the header declares
        longer.extend([0u8; 64]);
        std::fs::write(&path, &longer).unwrap();
        assert!(why(AdapterFile::read(&path)).contains("the file holds"));
        std::fs::write(&path, &good.bytes[..good.bytes.len() - 1]).unwrap(); // cut short
        assert!(why(AdapterFile::read(&path)).contains("the file holds"));
        std::fs::write(&path, [200u8, 0, 0, 0, 0, 0, 0, 0, b'{']).unwrap(); // a header past the end
        assert!(why(AdapterFile::read(&path)).contains("the header claims 200 bytes"));
        assert!(why(AdapterFile::read(&dir)).contains("not a regular file"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A tensor as a parse answers it: name, shape, largest magnitude.
    type Seen = (String, Vec<usize>, Option<f32>);

    proptest::proptest! {
        /// The streamed copy writes what `place` writes, bit for bit, in float32 and in
        /// bfloat16 (rounded to nearest, ties to even, as `half` rounds): any float32 bits,
        /// NaNs, infinities, subnormals and ties among them, rows kept or transposed.
        #[cfg(target_arch = "x86_64")]
        #[test]
        fn a_streamed_copy_is_the_placed_one(
            bits in proptest::collection::vec(proptest::prelude::any::<u32>(), 32 * 64),
            ties in proptest::collection::vec(0usize..32 * 64, 0..64),
            scale in proptest::sample::select(vec![1.0f32, 2.0, 0.375, -1.5, 3.0e38]),
            transpose in proptest::bool::ANY,
            bf16_slots in proptest::bool::ANY,
        ) {
            let mut bits = bits;
            for &t in &ties { // a value halfway between two bfloat16 values
                bits[t] = (bits[t] & 0xffff_0000) | 0x8000;
            }
            let values: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
            let f = file(&[("w", Dtype::F32, vec![32, 64], f32_bytes(&values))]);
            let e = &f.entries()[0];
            let src = &f.bytes()[e.start..e.end];
            let (dtype, width) = if bf16_slots { (SlotDtype::BF16, 2) } else { (SlotDtype::F32, 4) };
            let stride = if transpose { 64 } else { 96 }; // rows of 32 (transposed) or 64
            let copy = WeightCopy { tensor: 0, dst: 0, offset: 32, stride, transpose, scale };
            let size = width * (32 + 64 * stride) + 64;
            let (mut streamed, mut placed) = (vec![0u8; size + 64], vec![0u8; size + 64]);
            let (s0, p0) = (streamed.as_ptr().align_offset(64), placed.as_ptr().align_offset(64));
            let (s, p) = (&mut streamed[s0..s0 + size], &mut placed[p0..p0 + size]);
            proptest::prop_assert!(place_streamed(src, s, dtype, e, &copy));
            if bf16_slots {
                place(src, p, e, &copy, f32::from_le_bytes, |v| bf16::from_f32(v).to_ne_bytes());
            } else {
                place(src, p, e, &copy, f32::from_le_bytes, f32::to_ne_bytes);
            }
            proptest::prop_assert_eq!(&s[..], &p[..]);
        }

        /// A header seen before (the cache) parses a file exactly as safetensors does the
        /// first time: the same tensors in the same order, each measured from this file's own
        /// bytes, and the same refusal, word for word, for a file shorter or longer than its
        /// header says.
        #[test]
        fn a_cached_header_parses_as_safetensors_does(
            shapes in proptest::collection::vec((0usize..4, 1usize..5), 1..5),
            bf16_first in proptest::bool::ANY,
            seeds in proptest::collection::vec(0u32..1000, 2),
            cut in -3i64..3,
        ) {
            let make = |seed: u32| -> Vec<u8> {
                let tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = shapes
                    .iter()
                    .enumerate()
                    .map(|(i, &(r, c))| {
                        let values: Vec<f32> = (0..r * c)
                            .map(|k| ((k as u32 * 7 + seed * 13 + i as u32) % 101) as f32 - 50.0)
                            .collect();
                        let dtype = if bf16_first && i == 0 { Dtype::BF16 } else { Dtype::F32 };
                        let bytes = match dtype {
                            Dtype::BF16 => values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
                            _ => f32_bytes(&values),
                        };
                        (format!("w{i}"), dtype, vec![r, c], bytes)
                    })
                    .collect();
                let views: Vec<(String, TensorView<'_>)> = tensors
                    .iter()
                    .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
                    .collect();
                serialize(views, None).unwrap()
            };
            let expected = |bytes: &[u8]| -> Result<Vec<Seen>, String> {
                let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
                let mut got: Vec<_> = st
                    .tensors()
                    .into_iter()
                    .map(|(name, view)| {
                        let values: Vec<f32> = match view.dtype() {
                            Dtype::BF16 => view.data().chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
                            _ => read_f32(view.data()),
                        };
                        let max = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                        let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
                        ((start, start + view.data().len()), name, view.shape().to_vec(), Some(max))
                    })
                    .collect();
                // by where the bytes lie, then by name (empty tensors share an offset)
                got.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
                Ok(got.into_iter().map(|(_, n, s, m)| (n, s, m)).collect())
            };
            let parsed = |bytes: Vec<u8>| -> Result<Vec<Seen>, String> {
                let f = AdapterFile::from_bytes(bytes).map_err(|e| e.to_string())?;
                Ok(f.entries().iter().zip(f.max_abs()).map(|(e, &m)| (e.name.clone(), e.shape.clone(), m)).collect())
            };
            let (first, second) = (make(seeds[0]), make(seeds[1]));
            proptest::prop_assert_eq!(parsed(first.clone()), expected(&first)); // parsed, then cached
            proptest::prop_assert_eq!(parsed(second.clone()), expected(&second)); // from the cache
            let mut changed = second.clone();
            match cut {
                0 => changed.push(0),
                n if n > 0 => changed.extend(std::iter::repeat_n(7u8, n as usize)),
                n => changed.truncate(second.len().saturating_sub(n.unsigned_abs() as usize)),
            }
            let refused = parsed(changed.clone());
            proptest::prop_assert!(refused.is_err());
            let direct = SafeTensors::read_metadata(&changed).err().map(|e| format!("not a safetensors file ({e})"));
            proptest::prop_assert_eq!(refused.err(), direct);
        }
    }
}
