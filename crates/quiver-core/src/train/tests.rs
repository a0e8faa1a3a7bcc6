//! Unit tests of the trainer: the fused LoRA path against the plain one,
//! and the hand-written backward passes against autograd.

mod fused_lora_tests {
    use super::super::*;
    use candle_core::{Device, Var};

    fn lora(dropout: f32, seed: u64) -> TrainableLora {
        let dev = Device::Cpu;
        TrainableLora {
            a: Var::randn(0f32, 0.5, (3, 7), &dev).unwrap(),
            b: Var::randn(0f32, 0.5, (5, 3), &dev).unwrap(),
            scale: 4.0,
            dropout,
            state: Arc::new(Mutex::new(DropoutState {
                training: true,
                rng: rand::rngs::SmallRng::seed_from_u64(seed),
            })),
            grads: GradSlot::default(),
        }
    }

    /// The fused LoRA node equals the plain composition `s B(A(x * m / keep))`
    /// in value and in the gradients of x, A and B, with and without dropout.
    #[test]
    fn fused_lora_matches_the_composition() {
        for p in [0.0f32, 0.3] {
            let l = lora(p, 9);
            let x = Var::randn(0f32, 1.0, (2, 4, 7), &Device::Cpu).unwrap();
            let w = Tensor::randn(0f32, 1.0, (2, 4, 5), &Device::Cpu).unwrap();
            let y = l.delta(x.as_tensor()).unwrap();
            let g1 = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();

            // The same mask, from the same seed (the first draw of the
            // generator) through the kernel's own hash.
            let keep = 1.0 - p as f64;
            let seed = rand::rngs::SmallRng::seed_from_u64(9).random::<u32>();
            let threshold = crate::kernels::dropout_threshold(p);
            let m: Vec<f32> = (0..x.elem_count())
                .map(|i| {
                    if p == 0.0 || crate::kernels::dropout_keeps(seed, i, threshold) {
                        (1.0 / keep) as f32
                    } else {
                        0.0
                    }
                })
                .collect();
            let dropped = m.iter().filter(|&&v| v == 0.0).count();
            assert_eq!(dropped == 0, p == 0.0, "p = {p}: {dropped} dropped");
            let m = Tensor::from_vec(m, x.shape(), &Device::Cpu).unwrap();
            let xd = (x.as_tensor() * &m).unwrap();
            let y2 = (matmul_t(&matmul_t(&xd, l.a.as_tensor()).unwrap(), l.b.as_tensor()).unwrap()
                * l.scale)
                .unwrap();
            let g2 = (&y2 * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let close = |a: &Tensor, b: &Tensor, what: &str| {
                let d = (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(d < 1e-4, "p = {p}, {what}: max diff {d}");
            };
            close(&y, &y2, "value");
            for (t, what) in [
                (x.as_tensor(), "dx"),
                (l.a.as_tensor(), "dA"),
                (l.b.as_tensor(), "dB"),
            ] {
                close(g1.get(t).unwrap(), g2.get(t).unwrap(), what);
            }
        }
    }
}

mod hand_backward_tests {
    use super::super::*;
    use crate::lora::TargetModules;
    use crate::models::weights::{tiny_config, WeightMap};
    use crate::testutil::max_abs_diff;

    fn all_linears(dropout: f64) -> TrainConfig {
        TrainConfig {
            lora: LoraConfig {
                rank: 3,
                alpha: 6.0,
                dropout,
                target_modules: TargetModules::Names(
                    [
                        "q_proj",
                        "k_proj",
                        "v_proj",
                        "o_proj",
                        "gate_proj",
                        "up_proj",
                        "down_proj",
                    ]
                    .map(String::from)
                    .to_vec(),
                ),
                ..LoraConfig::default()
            },
            ..TrainConfig::default()
        }
    }

    /// The model's hand-written training pass gives the same loss and the
    /// same gradient for every LoRA factor as candle's autograd through the
    /// differentiable ops, with dropout (the same masks: same seeds, drawn
    /// in the same layer order), padding, targets on some positions only,
    /// grouped-query attention and two micro-batches.
    #[test]
    fn hand_backward_equals_autograd() {
        let dev = Device::Cpu;
        let cfg = tiny_config();
        let w = WeightMap::random(&cfg, 3, &dev).unwrap();
        let mut model = Llama::new(&cfg, &w, &dev).unwrap();
        for dropout in [0.0, 0.2] {
            let mut trainer = LoraTrainer::attach(&mut model, &all_linears(dropout)).unwrap();
            // B starts at zero, which would hide dA and the adapters' dx.
            for (i, v) in trainer.vars.iter().enumerate() {
                if i % 2 == 1 {
                    let t = Tensor::randn(0f32, 0.3, v.shape(), &dev).unwrap();
                    v.set(&t).unwrap();
                }
            }
            assert!(model.hand_backward_ready());
            let items = [
                Tokenized {
                    input: vec![1, 5, 9, 2],
                    target: vec![7, 3],
                },
                Tokenized {
                    input: vec![4],
                    target: vec![8, 8, 1, 6, 2, 11],
                },
                Tokenized {
                    input: vec![13, 14, 15],
                    target: vec![16],
                },
            ];
            let b1 = Batch::new(&[&items[0], &items[1]], &dev).unwrap();
            let b2 = Batch::new(&[&items[2]], &dev).unwrap();
            let micro = vec![(b1, 11u64), (b2, 12u64)];
            let (l_hand, g_hand) = trainer.gradients(&model, &micro, true).unwrap();
            let (l_auto, g_auto) = trainer.gradients(&model, &micro, false).unwrap();
            assert!((l_hand - l_auto).abs() < 1e-5, "loss {l_hand} vs {l_auto}");
            assert_eq!(g_hand.len(), 2 * 7 * cfg.num_hidden_layers);
            for (i, (h, a)) in g_hand.iter().zip(&g_auto).enumerate() {
                let (h, a) = (h.as_ref().unwrap(), a.as_ref().unwrap());
                let scale = a
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let d = max_abs_diff(h, a);
                assert!(scale > 0.0, "p = {dropout}, gradient {i} is zero");
                assert!(
                    d <= 1e-4 * scale.max(1.0),
                    "p = {dropout}, {} gradient of {}: max diff {d} (scale {scale})",
                    if i % 2 == 0 { "A" } else { "B" },
                    trainer.modules[i / 2]
                );
            }
            detach_adapters(&mut model);
        }
    }
}
