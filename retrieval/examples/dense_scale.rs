//! Dense search at scale: N unit vectors of width D (SmolLM2's 576 by default) drawn around
//! 4,096 cluster centres (embeddings of real text cluster by topic; uniform random vectors are
//! HNSW's worst case and nothing like them), searched exactly (every row, `Vectors::search_exact`)
//! and through the HNSW graph (`ann.rs`) that `kiln index build` makes from `ann::THRESHOLD`
//! chunks. Prints build time, the graph's size on disk, query latency p50/p99 for both, and the
//! graph's recall@10 against exact search, at the given ef_search and at wider ones (the graph
//! stays; only the search's beam widens).
//!
//!   cargo run --release -p kiln-retrieval --example dense_scale -- [N] [D] [QUERIES] [M EF_CONSTRUCTION EF_SEARCH]
//!
//! The graph's settings default to `AnnSpec::default()`, what `kiln index build` uses.

use std::time::Instant;

use kiln_retrieval::ann::{Ann, AnnSpec};
use kiln_retrieval::dense::Vectors;
use rand::{Rng, SeedableRng};

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let n = args.first().copied().unwrap_or(1_000_000);
    let d = args.get(1).copied().unwrap_or(576);
    let nq = args.get(2).copied().unwrap_or(1000);
    let clusters = 4096;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut gauss = move || -> f32 { (0..4).map(|_| rng.random::<f32>()).sum::<f32>() * 1.732 - 3.464 };
    let centres: Vec<f32> = (0..clusters * d).map(|_| gauss()).collect();
    let mut point = |c: usize| -> Vec<f32> {
        let mut x: Vec<f32> = centres[c * d..(c + 1) * d].iter().map(|&m| m + 1.0 * gauss()).collect();
        let norm = x.iter().map(|a| a * a).sum::<f32>().sqrt();
        x.iter_mut().for_each(|a| *a /= norm);
        x
    };
    let t0 = Instant::now();
    let mut v = Vectors::new(d);
    v.data.reserve(n * d);
    for i in 0..n {
        let x = point(i % clusters);
        v.push(vec![(String::new(), i as u32)], &x);
    }
    let queries: Vec<Vec<f32>> = (0..nq).map(|i| point((i * 7919) % clusters)).collect();
    println!("{n} vectors of width {d} ({:.1} GB f32) made in {:.1} s", (n * d * 4) as f64 / 1e9, t0.elapsed().as_secs_f64());

    let d0 = AnnSpec::default();
    let spec = AnnSpec { m: args.get(3).copied().unwrap_or(d0.m), ef_construction: args.get(4).copied().unwrap_or(d0.ef_construction), ef_search: args.get(5).copied().unwrap_or(d0.ef_search) };
    let t0 = Instant::now();
    let ann = Ann::build(&v, spec);
    println!("HNSW (M {}, ef_construction {}) built in {:.1} s on {} threads", spec.m, spec.ef_construction, t0.elapsed().as_secs_f64(), rayon::current_num_threads());
    let dir = std::env::temp_dir().join(format!("kiln-dense-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    ann.dump(&dir)?;
    let size: u64 = std::fs::read_dir(&dir)?.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum();
    println!("HNSW files: {:.2} GB (graph and a copy of the vectors); the vectors alone {:.2} GB", size as f64 / 1e9, (n * d * 4) as f64 / 1e9);
    let t0 = Instant::now();
    let mut ann = Ann::load(&dir, spec, n)?;
    println!("HNSW reloaded in {:.1} s", t0.elapsed().as_secs_f64());
    std::fs::remove_dir_all(&dir)?;

    let pct = |ms: &mut Vec<f64>, p: f64| {
        ms.sort_by(f64::total_cmp);
        ms[((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1]
    };
    let mut exact_ms = Vec::new();
    let exact: Vec<Vec<(usize, f32)>> = queries
        .iter()
        .map(|q| {
            let t0 = Instant::now();
            let e = v.search_exact(q, 10);
            exact_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            e
        })
        .collect();
    println!("exact search: p50 {:.2} ms, p99 {:.2} ms ({nq} queries, k 10)", pct(&mut exact_ms, 0.5), pct(&mut exact_ms, 0.99));
    let mut efs = vec![spec.ef_search];
    efs.extend([256, 512, 1024].into_iter().filter(|&e| e > spec.ef_search));
    for ef in efs {
        ann.spec.ef_search = ef;
        let (mut ann_ms, mut found) = (Vec::new(), 0usize);
        for (q, exact) in queries.iter().zip(&exact) {
            let t0 = Instant::now();
            let approx = ann.search(q, 10);
            ann_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            found += approx.iter().filter(|a| exact.iter().any(|e| e.0 == a.0)).count();
        }
        println!("HNSW search (ef_search {ef}): p50 {:.3} ms, p99 {:.3} ms, recall@10 against exact {:.1}%", pct(&mut ann_ms, 0.5), pct(&mut ann_ms, 0.99), 100.0 * found as f64 / (10 * nq) as f64);
    }
    Ok(())
}
