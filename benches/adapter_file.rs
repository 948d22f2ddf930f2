//! The loader's per-adapter work in Rust, on files shaped as the thousand-adapter bench's
//! (rank 8 on q/k/v/o of a SmolLM-135M-shaped model, float32: 3.7 MB a file): the read from
//! the page cache alone, the read with the header parsed and every weight measured (what a
//! load does before validation), and the same parse and measuring of a buffer already in
//! memory. 64 files in turn (237 MB), so each comes from memory, not the cache, as a host
//! tier's do; they share one header, as one recipe's adapters do, so after the first the
//! header's parse is the cached one.
//!
//!     cargo bench --bench adapter_file

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use loraplex::AdapterFile;
use safetensors::tensor::{serialize, Dtype, TensorView};

const FILES: usize = 64;
const LAYERS: usize = 30;
const RANK: usize = 8;
const HIDDEN: usize = 576;
const KV: usize = 192;

fn adapter_bytes(seed: u32) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).max(1);
    let mut values = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                ((state as f32 / u32::MAX as f32 - 0.5) * 0.04).to_le_bytes()
            })
            .collect()
    };
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for layer in 0..LAYERS {
        for (module, out) in [
            ("q_proj", HIDDEN),
            ("k_proj", KV),
            ("v_proj", KV),
            ("o_proj", HIDDEN),
        ] {
            let prefix = format!("base_model.model.model.layers.{layer}.self_attn.{module}");
            tensors.push((
                format!("{prefix}.lora_A.weight"),
                vec![RANK, HIDDEN],
                values(RANK * HIDDEN),
            ));
            tensors.push((
                format!("{prefix}.lora_B.weight"),
                vec![out, RANK],
                values(out * RANK),
            ));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    serialize(views, None).unwrap()
}

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("loraplex-bench-adapters-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let buffers: Vec<Vec<u8>> = (0..FILES as u32).map(adapter_bytes).collect();
    let paths: Vec<PathBuf> = buffers
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let path = dir.join(format!("a{i}.safetensors"));
            std::fs::write(&path, b).unwrap();
            path
        })
        .collect();
    let mut group = c.benchmark_group("adapter_file");
    group.throughput(Throughput::Bytes(buffers[0].len() as u64));
    let mut i = 0;
    group.bench_function("fs_read", |b| {
        b.iter(|| {
            i = (i + 1) % FILES;
            black_box(std::fs::read(&paths[i]).unwrap())
        })
    });
    group.bench_function("read_parse_measure", |b| {
        b.iter(|| {
            i = (i + 1) % FILES;
            black_box(AdapterFile::read(&paths[i]).unwrap())
        })
    });
    group.bench_function("parse_measure_in_memory", |b| {
        b.iter_batched(
            || {
                i = (i + 1) % FILES;
                buffers[i].clone()
            },
            |bytes| black_box(AdapterFile::from_bytes(bytes).unwrap()),
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();
    std::fs::remove_dir_all(&dir).unwrap();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
