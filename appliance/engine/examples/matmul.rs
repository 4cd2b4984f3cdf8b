//! One Q4_1 matmul (an FFN projection of SmolLM2-135M: 1536 × 576) at several batch
//! sizes: time per call and per activation row, the weight bandwidth and the rate in
//! multiply-adds. The weights cycle through 60 distinct matrices (33 MB) so that they
//! come from memory as in a decode step, not from cache.
//!
//! `cargo run --release -p appliance-engine --example matmul -- [THREADS]`

use appliance_engine::kernels::Q41Matrix;
use appliance_engine::pool::Pool;
use std::time::Instant;

fn main() {
    let (rows, cols) = (1536usize, 576usize);
    let threads: usize = match std::env::args().nth(1).map(|s| s.parse()) {
        None => 1,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("usage: matmul [THREADS] (a positive number)");
            std::process::exit(2);
        }
    };
    let kb = cols / 32;
    // Q4_1 blocks of 20 bytes: f16 scale 0x1c00 (2⁻⁸), f16 min 0x1c00, 16 bytes of nibbles.
    let mats: Vec<Q41Matrix> = (0..60)
        .map(|s| {
            let mut bytes: Vec<u8> = (0..rows * kb * 20)
                .map(|i| ((i * 31 + s * 7) % 251) as u8)
                .collect();
            for b in bytes.chunks_exact_mut(20) {
                b[..4].copy_from_slice(&[0x00, 0x1c, 0x00, 0x1c]);
            }
            Q41Matrix::from_ggml_bytes(&bytes, rows, cols).expect("whole blocks")
        })
        .collect();
    let pool = Pool::new(threads);
    println!("Q4_1 {rows}x{cols}, {threads} thread(s)");
    for m in [1usize, 2, 4, 8, 16, 64] {
        let x: Vec<f32> = (0..m * cols)
            .map(|i| ((i % 17) as f32 - 8.0) / 8.0)
            .collect();
        let mut out = vec![0f32; m * rows];
        let reps = 20;
        let t = Instant::now();
        for _ in 0..reps {
            for w in &mats {
                w.matmul_into(&x, m, &mut out, &pool);
            }
        }
        let dt = t.elapsed().as_secs_f64() / (reps * mats.len()) as f64;
        let bytes = (rows * kb * 20) as f64;
        println!(
            "m={m:3} {:8.1} µs/matmul {:6.1} µs/row {:5.1} GB/s {:6.1} GMAC/s",
            dt * 1e6,
            dt * 1e6 / m as f64,
            bytes / dt / 1e9,
            (rows * cols * m) as f64 / dt / 1e9
        );
    }
}
