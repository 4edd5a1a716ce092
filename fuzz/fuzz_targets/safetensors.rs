#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| em_fuzz::safetensors(data));
