//! `cargo xtask em-loss` on the tiny qwen2 fixture: the loss against an independent f64 forward
//! with the entropy written out by hand, its gradient against finite differences, f32 against
//! f64, the gradient file, and one-line errors that name the input file.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use em_lab::em_loss::{compute, read_input, EmLossInput, EmLossOptions};
use em_pipeline::train::ModelDtype;
use em_tests::tiny_qwen2;
use em_train::models::CausalLm;
use em_train::Sequence;

fn input() -> EmLossInput {
    let seq = |p: &[u32], r: &[u32]| Sequence {
        prompt_ids: p.to_vec(),
        response_ids: r.to_vec(),
    };
    EmLossInput {
        temperature: 0.5,
        sequences: vec![
            seq(&[1, 40, 41, 42, 2, 1, 50], &[60, 61, 62, 63, 64, 2]),
            seq(&[1, 100, 7], &[300, 301]),
            seq(&[5, 6, 7, 8, 9, 10, 11, 12, 13], &[383]),
        ],
    }
}

/// Σ over response-predicting positions of the entropy at τ, from a per-sequence f64 forward.
fn direct(model: &CausalLm, input: &EmLossInput) -> (f64, usize) {
    let (mut total, mut n) = (0.0, 0);
    for s in &input.sequences {
        let ids: Vec<u32> = s
            .prompt_ids
            .iter()
            .chain(&s.response_ids)
            .copied()
            .collect();
        let t = ids.len();
        let x = Tensor::from_vec(ids, (1, t), &Device::Cpu).unwrap();
        let logits = model.forward(&x).unwrap().squeeze(0).unwrap();
        let rows = logits
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let p = s.prompt_ids.len();
        for row in &rows[p - 1..p + s.response_ids.len() - 1] {
            let z: Vec<f64> = row.iter().map(|v| v / input.temperature).collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = z.iter().map(|v| (v - m).exp()).sum();
            total -= z
                .iter()
                .map(|v| {
                    let q = (v - m).exp() / sum;
                    q * q.ln()
                })
                .sum::<f64>();
            n += 1;
        }
    }
    (total / n as f64, n)
}

#[test]
fn loss_matches_a_direct_computation_and_gradients_match_finite_differences() {
    let dir = tiny_qwen2();
    let model = CausalLm::from_hf_dir(&dir, DType::F64, &Device::Cpu).unwrap();
    let inp = input();
    let (loss, n, grads) = compute(&model, &inp, 2, true).unwrap();
    let (want, want_n) = direct(&model, &inp);
    assert_eq!(n, want_n);
    assert_eq!(n, 9);
    assert!(
        (loss - want).abs() <= 1e-12 * want.abs(),
        "{loss} vs {want}"
    );

    // Central differences on the largest-gradient entry of a few tensors of each kind.
    let eps = 1e-6;
    let mut worst = 0.0f64;
    for (name, var, g) in grads.iter() {
        let wanted = name.contains("embed")
            || name.contains("layers.0.self_attn.q_proj")
            || name.contains("layers.1.mlp.down_proj.weight")
            || name.contains("layers.1.input_layernorm")
            || name == "model.norm.weight";
        if !wanted {
            continue;
        }
        let g = g.unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let values = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let i = (0..g.len())
            .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
            .unwrap();
        let set = |v: f64| {
            let mut vals = values.clone();
            vals[i] = v;
            var.set(&Tensor::from_vec(vals, var.as_tensor().shape(), &Device::Cpu).unwrap())
                .unwrap();
        };
        set(values[i] + eps);
        let plus = compute(&model, &inp, 3, true).unwrap().0;
        set(values[i] - eps);
        let minus = compute(&model, &inp, 3, true).unwrap().0;
        set(values[i]);
        let fd = (plus - minus) / (2.0 * eps);
        let rel = (fd - g[i]).abs() / fd.abs().max(g[i].abs()).max(1e-3);
        assert!(
            rel <= 1e-6,
            "{name}[{i}]: autograd {} vs FD {fd} ({rel:.1e})",
            g[i]
        );
        worst = worst.max(rel);
    }
    eprintln!("em-loss on the fixture: loss {loss:.6}, max FD relative error {worst:.1e}");

    // f32 agrees with f64 to well under the 1e-4 a PyTorch comparison allows.
    let m32 = CausalLm::from_hf_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    let (l32, _, g32) = compute(&m32, &inp, 4, true).unwrap();
    assert!((l32 - loss).abs() <= 1e-5 * loss, "f32 {l32} vs f64 {loss}");
    // Every tensor, relative to its largest entry: what `em-loss --check-against` measures.
    let (worst, name) = em_lab::em_loss::worst_gradient_difference(&g32, &grads).unwrap();
    assert!(worst <= 1e-4, "f32 gradient of {name} off by {worst:.2e}");
}

#[test]
fn gradient_file_names_every_parameter_and_input_errors_name_the_file() {
    let dir = tiny_qwen2();
    let tmp = tempfile::tempdir().unwrap();
    let input_path = tmp.path().join("in.json");
    let inp = input();
    let seqs: Vec<_> = inp
        .sequences
        .iter()
        .map(|s| serde_json::json!({"prompt_ids": s.prompt_ids, "response_ids": s.response_ids}))
        .collect();
    std::fs::write(
        &input_path,
        serde_json::json!({"temperature": 0.5, "sequences": seqs}).to_string(),
    )
    .unwrap();
    let grads_path = tmp.path().join("g.safetensors");
    em_lab::em_loss::run(&EmLossOptions {
        model: dir.clone(),
        input: input_path.clone(),
        grads_out: Some(grads_path.clone()),
        dtype: ModelDtype::F32,
        micro_batch: 2,
        train_pad_row: false,
        device: "cpu".into(),
        recompute: true,
        // The path a GPU run takes (`--device cuda --check-against cpu`), here on one device.
        check_against: Some("cpu".into()),
    })
    .unwrap();
    let saved = candle_core::safetensors::load(&grads_path, &Device::Cpu).unwrap();
    let model = CausalLm::from_hf_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(saved.len(), model.parameters().len());
    for (name, var) in model.parameters() {
        let g = &saved[&name];
        assert_eq!(g.dims(), var.dims(), "{name}");
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "{name}: zero gradient");
    }
    assert!(
        !saved.contains_key("lm_head.weight"),
        "tied head saved twice"
    );

    let bad = |text: &str| -> String {
        let p = tmp.path().join("bad.json");
        std::fs::write(&p, text).unwrap();
        let shown = p.display().to_string();
        match read_input(&p) {
            Err(e) => format!("{e:#}").replace(&shown, "F"),
            Ok(inp) => {
                let m = CausalLm::from_hf_dir(&dir, DType::F32, &Device::Cpu).unwrap();
                compute(&m, &inp, 2, true)
                    .map(|_| ())
                    .unwrap_err()
                    .to_string()
            }
        }
    };
    assert_eq!(
        bad("{\"temperature\": 0.5,\n \"sequences\": [ {\"prompt_ids\": [1], \"response_ids\": [2,]} ]}"),
        "F: bad input at line 2, column 56: trailing comma"
    );
    assert_eq!(
        bad("{\"temperature\": 0, \"sequences\": [{\"prompt_ids\": [1], \"response_ids\": [2]}]}"),
        "F: temperature 0 is not a finite number > 0"
    );
    assert_eq!(
        bad("{\"temperature\": 0.5, \"sequences\": [{\"prompt_ids\": [1], \"response_ids\": []}]}"),
        "sequence 0: empty response"
    );
    assert_eq!(
        bad("{\"temperature\": 0.5, \"sequences\": [{\"prompt_ids\": [1], \"response_ids\": [2]}, {\"prompt_ids\": [1], \"response_ids\": [384]}]}"),
        "sequence 1: token id 384 is not below the vocabulary size 384"
    );
    let missing = read_input(Path::new("/nonexistent/in.json")).unwrap_err();
    assert!(format!("{missing:#}").starts_with("/nonexistent/in.json: cannot read"));
}
