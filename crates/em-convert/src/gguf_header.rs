//! A GGUF header reader that checks every count, length and offset against the bytes that are
//! there before it allocates or seeks: files come from the internet, and a header that claims
//! 10^12 tensors, a string past the end or a tensor larger than the file is a one-line error.
//!
//! It yields candle's `gguf_file::Content`, so tensors are read with candle as before; candle's own
//! parser is not used for headers because it divides by a zero `general.alignment` and does not
//! check tensor extents, alignment or overlaps.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{bail, Result};
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;

use crate::gguf::ggml_type_id;

/// Longest string and array accepted (llama.cpp's GGUF_MAX_STRING_LENGTH, _ARRAY_ELEMENTS).
const MAX_LENGTH: u64 = 1 << 30;
/// Most dimensions of a tensor (GGML_MAX_DIMS).
const MAX_DIMS: u32 = 4;
/// Deepest nesting of arrays in metadata.
const MAX_DEPTH: usize = 4;
/// Smallest encodings, for rejecting counts the remaining bytes cannot hold: a metadata entry
/// (key length, empty key, type, one byte) and a tensor info (name length, one dimension, type,
/// offset).
const MIN_ENTRY_BYTES: u64 = 8 + 4 + 1;
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// Every ggml type candle can read.
const TYPES: [GgmlDType; 15] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q8_1,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::Q8K,
];

/// Reads and checks the header of the GGUF in `reader` (its whole length is the file); `origin`
/// names it in errors.
pub fn read_header<R: Read + Seek>(reader: &mut R, origin: &Path) -> Result<Content> {
    let len = reader.seek(SeekFrom::End(0))?;
    reader.seek(SeekFrom::Start(0))?;
    let mut r = Bounded {
        reader,
        pos: 0,
        len,
        origin,
    };
    let magic = r.array::<4>("the magic")?;
    if &magic != b"GGUF" {
        bail!(
            "{}: not a GGUF file (it starts with \"{}\", not \"GGUF\")",
            origin.display(),
            magic.escape_ascii()
        );
    }
    let magic = match r.u32("the version")? {
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        v => bail!(
            "{}: GGUF version {v} is not supported (versions 2 and 3 are)",
            origin.display()
        ),
    };
    let n_tensors = r.u64("the tensor count")?;
    let n_entries = r.u64("the metadata count")?;
    let needed = n_tensors
        .saturating_mul(MIN_TENSOR_INFO_BYTES)
        .saturating_add(n_entries.saturating_mul(MIN_ENTRY_BYTES));
    if needed > r.remaining() {
        bail!(
            "{}: the header claims {n_tensors} tensors and {n_entries} metadata entries, which need at least {needed} bytes; the file has {} left",
            origin.display(),
            r.remaining()
        );
    }

    let mut metadata = HashMap::new();
    for _ in 0..n_entries {
        let key = r.string("a metadata key")?;
        let ty = r.u32("a value type")?;
        let value = r.value(ty, &key, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            bail!("{}: metadata key {key} appears twice", origin.display());
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => crate::gguf::ALIGNMENT,
        Some(Value::U32(a)) if a.is_power_of_two() => *a as u64,
        Some(v) => bail!(
            "{}: general.alignment is {v:?}; it must be a u32 power of two",
            origin.display()
        ),
    };

    let mut tensors: Vec<(String, TensorInfo, u64)> = Vec::new();
    for _ in 0..n_tensors {
        let name = r.string("a tensor name")?;
        let n_dims = r.u32("a tensor's dimension count")?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            bail!(
                "{}: tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} are allowed)",
                origin.display()
            );
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64("a tensor dimension")?);
        }
        // An empty tensor has no bytes to read, and candle would read them from a dangling slice.
        if dims.contains(&0) {
            bail!(
                "{}: tensor {name} has a dimension of 0 ({dims:?})",
                origin.display()
            );
        }
        let type_id = r.u32("a tensor type")?;
        let Some(dtype) = TYPES.iter().copied().find(|t| ggml_type_id(*t) == type_id) else {
            bail!(
                "{}: tensor {name} has ggml type {type_id}, which is unknown or not supported",
                origin.display()
            );
        };
        let offset = r.u64("a tensor offset")?;
        if offset % alignment != 0 {
            bail!(
                "{}: tensor {name} starts at data offset {offset}, not a multiple of the alignment {alignment}",
                origin.display()
            );
        }
        let block = dtype.block_size() as u64;
        let bytes = dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .and_then(|n| (n / block).checked_mul(dtype.type_size() as u64));
        let Some(bytes) = bytes else {
            bail!(
                "{}: tensor {name} of shape {dims:?} has more bytes than 64 bits count",
                origin.display()
            );
        };
        if dims[0] % block != 0 {
            bail!(
                "{}: tensor {name}: its first dimension {} is not a multiple of {dtype:?}'s block of {block}",
                origin.display(),
                dims[0]
            );
        }
        // GGUF lists dimensions innermost first; candle's shapes are row-major.
        let shape: Vec<usize> = dims.iter().rev().map(|&d| d as usize).collect();
        if tensors.iter().any(|(n, _, _)| *n == name) {
            bail!("{}: tensor {name} appears twice", origin.display());
        }
        tensors.push((
            name,
            TensorInfo {
                ggml_dtype: dtype,
                shape: shape.into(),
                offset,
            },
            bytes,
        ));
    }
    let tensor_data_offset = r.pos.div_ceil(alignment) * alignment;

    // Every tensor inside the file and none overlapping another.
    let mut extents: Vec<(u64, u64, &str)> = tensors
        .iter()
        .map(|(name, info, bytes)| {
            (
                info.offset,
                info.offset.saturating_add(*bytes),
                name.as_str(),
            )
        })
        .collect();
    extents.sort();
    let data_len = len.saturating_sub(tensor_data_offset);
    let mut previous: Option<(u64, &str)> = None;
    for &(start, end, name) in &extents {
        if end > data_len {
            bail!(
                "{}: truncated: tensor {name} ends at byte {}, the file has {len}",
                origin.display(),
                tensor_data_offset.saturating_add(end)
            );
        }
        if let Some((prev_end, prev)) = previous {
            if start < prev_end {
                bail!(
                    "{}: tensors {prev} and {name} overlap (data offsets {start} < {prev_end})",
                    origin.display()
                );
            }
        }
        if end > start {
            previous = Some((end, name));
        }
    }
    Ok(Content {
        magic,
        metadata,
        tensor_infos: tensors
            .into_iter()
            .map(|(name, info, _)| (name, info))
            .collect(),
        tensor_data_offset,
    })
}

/// A reader that knows how many bytes are left and refuses to read past them.
struct Bounded<'a, R> {
    reader: &'a mut R,
    pos: u64,
    len: u64,
    origin: &'a Path,
}

impl<R: Read> Bounded<'_, R> {
    fn remaining(&self) -> u64 {
        self.len - self.pos
    }

    fn check(&self, n: u64, what: &str) -> Result<()> {
        if n > self.remaining() {
            bail!(
                "{}: {what} at byte {} needs {n} bytes; the file ends at {}",
                self.origin.display(),
                self.pos,
                self.len
            );
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        self.check(N as u64, what)?;
        let mut b = [0u8; N];
        self.reader.read_exact(&mut b)?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        if n > MAX_LENGTH {
            bail!(
                "{}: {what} at byte {} claims {n} bytes (at most {MAX_LENGTH} are allowed)",
                self.origin.display(),
                self.pos
            );
        }
        self.check(n, what)?;
        let mut b = vec![0u8; n as usize];
        self.reader.read_exact(&mut b)?;
        self.pos += n;
        String::from_utf8(b).map_err(|_| {
            anyhow::anyhow!(
                "{}: {what} ending at byte {} is not UTF-8",
                self.origin.display(),
                self.pos
            )
        })
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!(
                    "{}: {key}: boolean byte {b} (0 or 1 are allowed)",
                    self.origin.display()
                ),
            },
            8 => Value::String(self.string(key)?),
            9 => {
                if depth >= MAX_DEPTH {
                    bail!(
                        "{}: {key}: arrays nested deeper than {MAX_DEPTH}",
                        self.origin.display()
                    );
                }
                let inner = self.u32(key)?;
                let n = self.u64(key)?;
                let min = match inner {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => bail!(
                        "{}: {key}: array of unknown value type {t}",
                        self.origin.display()
                    ),
                };
                if n > MAX_LENGTH || n.saturating_mul(min) > self.remaining() {
                    bail!(
                        "{}: {key}: an array of {n} elements at byte {} does not fit in the {} bytes left",
                        self.origin.display(),
                        self.pos,
                        self.remaining()
                    );
                }
                let mut values = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    values.push(self.value(inner, key, depth + 1)?);
                }
                Value::Array(values)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            t => bail!("{}: {key}: unknown value type {t}", self.origin.display()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A GGUF v3 header by hand: metadata (key, type, value bytes), then tensor infos (name,
    /// dims innermost first, type id, offset), then `data` after alignment to 32.
    fn gguf(
        entries: &[(&str, u32, Vec<u8>)],
        tensors: &[(&str, &[u64], u32, u64)],
        data: usize,
    ) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((entries.len() as u64).to_le_bytes());
        let string = |b: &mut Vec<u8>, s: &str| {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        for (key, ty, value) in entries {
            string(&mut b, key);
            b.extend(ty.to_le_bytes());
            b.extend(value);
        }
        for (name, dims, ty, offset) in tensors {
            string(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            for d in *dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(offset.to_le_bytes());
        }
        b.resize(b.len().div_ceil(32) * 32 + data, 0);
        b
    }

    fn read(bytes: &[u8]) -> Result<Content> {
        read_header(&mut Cursor::new(bytes), Path::new("x.gguf"))
    }

    fn error(bytes: &[u8]) -> String {
        let e = read(bytes).unwrap_err().to_string();
        assert!(e.starts_with("x.gguf: ") && !e.contains('\n'), "{e}");
        e
    }

    #[test]
    fn a_valid_header_reads_with_candle_shapes() {
        let b = gguf(
            &[(
                "general.architecture",
                8,
                [5u64.to_le_bytes().to_vec(), b"llama".to_vec()].concat(),
            )],
            &[("a", &[4, 2], 0, 0), ("b", &[32], 8, 32)],
            96,
        );
        let c = read(&b).unwrap();
        assert_eq!(c.tensor_infos["a"].shape.dims(), &[2, 4]);
        assert_eq!(c.tensor_data_offset as usize, b.len() - 96);
        assert!(matches!(&c.metadata["general.architecture"], Value::String(s) if s == "llama"));
    }

    #[test]
    fn claimed_sizes_beyond_the_file_are_errors_before_allocation() {
        // 10^12 tensors.
        let mut b = gguf(&[], &[], 0);
        b[8..16].copy_from_slice(&1_000_000_000_000u64.to_le_bytes());
        assert!(error(&b).contains("claims 1000000000000 tensors"));
        // A string length past the end.
        let b = gguf(&[("k", 8, u64::MAX.to_le_bytes().to_vec())], &[], 0);
        assert!(error(&b).contains("claims 18446744073709551615 bytes"));
        let b = gguf(&[("k", 8, 1000u64.to_le_bytes().to_vec())], &[], 0);
        assert!(error(&b).contains("needs 1000 bytes"));
        // An array of 2^40 u32.
        let b = gguf(
            &[(
                "k",
                9,
                [
                    4u32.to_le_bytes().to_vec(),
                    (1u64 << 40).to_le_bytes().to_vec(),
                ]
                .concat(),
            )],
            &[],
            0,
        );
        assert!(error(&b).contains("does not fit"));
        // A tensor larger than the file, and one whose element count overflows.
        let b = gguf(&[], &[("t", &[1 << 20, 1 << 20], 0, 0)], 64);
        assert!(error(&b).contains("truncated: tensor t"));
        let b = gguf(&[], &[("t", &[u64::MAX, 3], 0, 0)], 64);
        assert!(error(&b).contains("more bytes than 64 bits count"));
    }

    #[test]
    fn bad_offsets_alignment_and_types_are_errors() {
        let b = gguf(&[], &[("a", &[8], 0, 0), ("b", &[8], 0, 16)], 64);
        assert!(error(&b).contains("not a multiple of the alignment 32"));
        let b = gguf(&[], &[("a", &[16], 0, 0), ("b", &[8], 0, 32)], 128);
        assert!(error(&b).contains("tensors a and b overlap"));
        let b = gguf(
            &[("general.alignment", 4, 0u32.to_le_bytes().to_vec())],
            &[],
            0,
        );
        assert!(error(&b).contains("power of two"));
        let b = gguf(&[], &[("a", &[8], 99, 0)], 64);
        assert!(error(&b).contains("ggml type 99"));
        let b = gguf(&[], &[("a", &[8], 8, 0)], 64);
        assert!(error(&b).contains("block of 32"));
        let b = gguf(&[], &[("a", &[8], 0, 0), ("a", &[8], 0, 32)], 64);
        assert!(error(&b).contains("appears twice"));
        let b = gguf(&[], &[("a", &[32, 0], 0, 0)], 64);
        assert!(error(&b).contains("a dimension of 0"));
        let b = gguf(&[("k", 7, vec![2])], &[], 0);
        assert!(error(&b).contains("boolean byte 2"));
        let mut nested = vec![];
        for _ in 0..6 {
            nested.extend(9u32.to_le_bytes());
            nested.extend(1u64.to_le_bytes());
        }
        let b = gguf(&[("k", 9, nested)], &[], 0);
        assert!(error(&b).contains("nested deeper"));
        let mut b = gguf(&[], &[], 0);
        b[4] = 1;
        assert!(error(&b).contains("version 1"));
        assert!(error(b"GGU").contains("the magic"));
    }
}
