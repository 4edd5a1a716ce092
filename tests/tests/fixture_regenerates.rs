//! `cargo xtask fixture tiny-qwen2 --seed 0` reproduces the committed fixture byte for byte.

#[test]
fn committed_fixture_is_what_the_seeded_command_writes() {
    let tmp = tempfile::tempdir().unwrap();
    em_lab::fixture::write_tiny_qwen2(tmp.path(), 0).unwrap();
    let committed = em_tests::tiny_qwen2();
    for file in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        let a = std::fs::read(committed.join(file)).unwrap();
        let b = std::fs::read(tmp.path().join(file)).unwrap();
        assert!(
            a == b,
            "{file} differs from a fresh `cargo xtask fixture tiny-qwen2 --seed 0`"
        );
    }
}
