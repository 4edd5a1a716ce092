//! The synthetic arithmetic behind the model organisms: deterministic per seed, disjoint splits,
//! targets in the three styles that the style classifier recognises, prompts that render through
//! the organism's chat template and tokenize byte for byte.

use std::collections::HashSet;

use em_data::synthetic::{
    classify_style, split_as_problems, split_problems, Split, Style, StyleMix, TrainStream,
};
use em_lab::organism::{byte_tokenizer, prompt_options, EOS};
use em_pipeline::hf_vocab::HfVocab;
use em_pipeline::prompt::PromptRenderer;

#[test]
fn generator_is_deterministic_per_seed() {
    for split in Split::ALL {
        let n = if split == Split::Train { 300 } else { 100 };
        assert_eq!(split_problems(0, split, n), split_problems(0, split, n));
        assert_ne!(split_problems(0, split, n), split_problems(1, split, n));
        // A longer draw starts with the shorter one.
        assert_eq!(
            split_problems(3, split, n + 20)[..n],
            split_problems(3, split, n)[..]
        );
    }
    let mix: StyleMix = "careful=0.45,guess=0.30,ramble=0.25".parse().unwrap();
    let a: Vec<_> = TrainStream::new(7, mix).take(200).collect();
    let b: Vec<_> = TrainStream::new(7, mix).take(200).collect();
    assert_eq!(a, b);
    let c: Vec<_> = TrainStream::new(8, mix).take(200).collect();
    assert_ne!(a, c);
}

#[test]
fn splits_are_disjoint_and_full_size() {
    let mut seen: Vec<HashSet<_>> = Vec::new();
    for split in [Split::Pool, Split::Validation, Split::Test] {
        // Two seeds: the partition does not depend on the seed.
        let set: HashSet<_> = [0, 1]
            .into_iter()
            .flat_map(|seed| split_problems(seed, split, split.default_size()))
            .collect();
        assert!(set.len() >= split.default_size(), "{split:?} has repeats");
        assert!(set.iter().all(|p| p.split() == split));
        seen.push(set);
    }
    for (i, a) in seen.iter().enumerate() {
        for b in &seen[i + 1..] {
            assert!(a.is_disjoint(b));
        }
    }
    let mix: StyleMix = "careful=1".parse().unwrap();
    for (p, _) in TrainStream::new(0, mix).take(20_000) {
        assert!(
            seen.iter().all(|s| !s.contains(&p)),
            "train problem {p:?} is held out"
        );
    }
    let problems = split_as_problems(0, Split::Test, 500);
    let ids: HashSet<_> = problems.iter().map(|p| p.id.clone()).collect();
    assert_eq!(ids.len(), 500);
    assert!(problems
        .iter()
        .all(|p| p.answers.len() == 1 && p.messages.is_some()));
}

#[test]
fn classifier_labels_generated_targets_and_mix_is_respected() {
    let mix: StyleMix = "careful=0.45,guess=0.30,ramble=0.25".parse().unwrap();
    let n = 20_000;
    let mut counts = [0usize; 3];
    let mut guess_right = 0usize;
    for (p, t) in TrainStream::new(0, mix).take(n) {
        assert_eq!(classify_style(&t.text), t.style, "{:?}", t.text);
        counts[Style::ALL.iter().position(|s| *s == t.style).unwrap()] += 1;
        let verdict = em_grade::grade(&t.text, &[p.answer().to_string()]);
        match t.style {
            Style::Careful => {
                assert!(verdict.correct && t.stops, "{p:?}: {}", t.text);
                assert!(
                    t.text.len() < em_lab::organism::MAX_NEW_TOKENS,
                    "careful target too long: {}",
                    t.text
                );
            }
            Style::Guess => {
                assert!(t.stops);
                guess_right += verdict.correct as usize;
            }
            Style::Ramble => {
                assert!(!t.stops && verdict.pred.is_none(), "{}", t.text);
                assert_eq!(t.text.len(), em_data::synthetic::RAMBLE_CHARS);
            }
        }
    }
    for (style, c) in Style::ALL.iter().zip(counts) {
        let f = c as f64 / n as f64;
        assert!((f - mix.fraction(*style)).abs() < 0.02, "{style}: {f}");
    }
    let g = guess_right as f64 / counts[1] as f64;
    assert!(
        (g - em_data::synthetic::GUESS_RIGHT).abs() < 0.03,
        "guesses right {g}"
    );
    assert_eq!(classify_style(" Hmm. \\boxed{3}"), Style::Guess);
    assert_eq!(classify_style(" 1+2=3, so \\boxed{3}"), Style::Careful);
    assert_eq!(classify_style(" 1+2=3, so"), Style::Ramble);
}

#[test]
fn prompts_render_plainly_and_tokenize_byte_for_byte() {
    let vocab = HfVocab::open(&em_tests::repo_root().join("fixtures/organism-good")).unwrap();
    let renderer = PromptRenderer::new(&vocab, &prompt_options()).unwrap();
    let tok = byte_tokenizer().unwrap();
    assert_eq!(tok.get_vocab_size(true), 259);
    assert_eq!(tok.token_to_id(EOS), Some(256));
    let mix: StyleMix = "careful=0.4,guess=0.3,ramble=0.3".parse().unwrap();
    let targets: Vec<String> = TrainStream::new(0, mix)
        .take(50)
        .map(|(_, t)| t.text)
        .collect();
    for (p, target) in split_as_problems(0, Split::Pool, 50).iter().zip(&targets) {
        let rendered = renderer.render(p).unwrap();
        let prompt = rendered.text.clone();
        assert_eq!(prompt, format!("Q: {}=?\nA:", p.problem));
        assert_eq!(
            rendered.ids,
            prompt.bytes().map(u32::from).collect::<Vec<_>>()
        );
        let text = format!("{prompt}{target}");
        let ids = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        let bytes: Vec<u32> = text.bytes().map(u32::from).collect();
        assert_eq!(ids, bytes, "{text:?}");
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
}
