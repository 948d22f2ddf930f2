//! The loader's per-adapter read in Rust, on files shaped as a served adapter's (rank 16 on
//! q/k/v/o of a SmolLM-135M-shaped model, float32: 7.4 MB a file), from the page cache:
//!
//! - `before_read_whole_parse`: the read before adapters were untrusted input, the whole
//!   file read (`std::fs::read`) then parsed and measured;
//! - `read_parse_measure`: opened without blocking, refused unless regular, the header's
//!   declared size checked against the file before the data is read (`AdapterFile::read`);
//! - `read_beneath_openat2` / `read_beneath_walk`: the same, opened beneath the adapter's
//!   root (`folder/adapter_model.safetensors`) with `openat2` `RESOLVE_BENEATH`, or with the
//!   component walk that stands in for it where `openat2` is filtered (the loader's path);
//! - `parse_measure_in_memory`: the parse and measuring of a buffer already in memory.
//!
//! 64 files in turn (475 MB), so each comes from memory, not the cache, as a host tier's
//! do; they share one header, as one recipe's adapters do, so after the first the header's
//! parse is the cached one.
//!
//!     cargo bench --bench adapter_file

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use loraplex::confined::Resolve;
use loraplex::AdapterFile;
use safetensors::tensor::{serialize, Dtype, TensorView};

const FILES: usize = 64;
const LAYERS: usize = 30;
const RANK: usize = 16;
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
    let rels: Vec<PathBuf> = (0..FILES)
        .map(|i| PathBuf::from(format!("a{i}/adapter_model.safetensors")))
        .collect();
    let paths: Vec<PathBuf> = buffers
        .iter()
        .zip(&rels)
        .map(|(b, rel)| {
            let path = dir.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, b).unwrap();
            path
        })
        .collect();
    let mut group = c.benchmark_group("adapter_file");
    group.throughput(Throughput::Bytes(buffers[0].len() as u64));
    let mut i = 0;
    group.bench_function("before_read_whole_parse", |b| {
        b.iter(|| {
            i = (i + 1) % FILES;
            black_box(AdapterFile::from_bytes(std::fs::read(&paths[i]).unwrap()).unwrap())
        })
    });
    group.bench_function("read_parse_measure", |b| {
        b.iter(|| {
            i = (i + 1) % FILES;
            black_box(AdapterFile::read(&paths[i]).unwrap())
        })
    });
    for (name, how) in [
        ("read_beneath_openat2", Resolve::Auto),
        ("read_beneath_walk", Resolve::Walk),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % FILES;
                black_box(AdapterFile::read_beneath(&dir, &rels[i], how).unwrap())
            })
        });
    }
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
