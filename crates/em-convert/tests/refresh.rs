//! The in-place refreshed sampling GGUF: the first write equals `hf_to_gguf` byte for byte, and
//! a refresh rewrites exactly the tensors that changed, to the values given.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use em_convert::gguf::GgufFile;
use em_convert::refresh::GgufRefresh;
use em_convert::safetensors_io::HfTensors;
use em_convert::{hf_to_gguf, OutType};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-qwen2")
}

/// A GGUF tensor's values as f32.
fn values(path: &std::path::Path, name: &str) -> Vec<f32> {
    GgufFile::open(path)
        .unwrap()
        .tensor(name)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn refresh_writes_the_converted_file_then_only_what_changed() {
    let dir = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let tensors = HfTensors::open(&dir).unwrap();
    let shapes: Vec<(String, Vec<usize>)> = tensors
        .names()
        .into_iter()
        .map(|n| {
            let s = tensors.shape(&n).unwrap();
            (n, s)
        })
        .collect();
    for outtype in [OutType::F16, OutType::F32] {
        let converted = tmp.path().join(format!("converted-{outtype:?}.gguf"));
        hf_to_gguf(&dir, &converted, outtype).unwrap();
        let path = tmp.path().join(format!("refreshed-{outtype:?}.gguf"));
        let mut refresh = GgufRefresh::new(&dir, &shapes, outtype, &path).unwrap();
        let mut weights = |name: &str| -> anyhow::Result<Tensor> { tensors.load_f32(name) };
        let first = refresh.publish(&mut weights).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes, std::fs::read(&converted).unwrap(), "{outtype:?}");
        assert_eq!(first.bytes, bytes.len() as u64);

        // The same weights again: nothing to write.
        let again = refresh.publish(&mut weights).unwrap();
        assert_eq!((again.bytes, again.tensors), (0, 0));

        // One tensor changes (given in bf16 on purpose: any float type is accepted).
        let target = "model.layers.1.mlp.down_proj.weight";
        let changed = (tensors.load_f32(target).unwrap() + 0.5)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let mut weights = |name: &str| -> anyhow::Result<Tensor> {
            if name == target {
                Ok(changed.clone())
            } else {
                tensors.load_f32(name)
            }
        };
        let third = refresh.publish(&mut weights).unwrap();
        assert_eq!(third.tensors, 1);
        let width = if outtype == OutType::F16 { 2 } else { 4 };
        assert_eq!(third.bytes, (changed.elem_count() * width) as u64);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), bytes.len() as u64);
        let got = values(&path, "blk.1.ffn_down.weight");
        let want = changed
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            got == want,
            "{outtype:?}: bf16 values near 0.5 are exact in f16 and f32"
        );
        assert!(
            values(&path, "blk.0.ffn_down.weight") == values(&converted, "blk.0.ffn_down.weight"),
            "{outtype:?}: an unchanged tensor keeps its bytes"
        );
    }
}
