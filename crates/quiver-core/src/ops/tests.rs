use super::*;
use candle_core::{Device, Var};

fn close(a: &Tensor, b: &Tensor, tol: f32) {
    let d = crate::testutil::max_abs_diff(a, b);
    assert!(d <= tol, "max abs diff {d} > {tol}");
}

#[test]
fn fused_equals_composed() -> Result<()> {
    let dev = Device::Cpu;
    let xs = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev)?;
    let w = Tensor::randn(1f32, 0.1, 8, &dev)?;
    close(
        &rms_norm(&xs, &w, 1e-5)?,
        &rms_norm_composed(&xs, &w, 1e-5)?,
        1e-5,
    );
    close(&softmax_last_dim(&xs)?, &softmax_composed(&xs)?, 1e-6);
    let cos = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
    let sin = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
    close(
        &rope(&xs, &cos, &sin)?,
        &rope_composed(&xs, &cos, &sin)?,
        1e-5,
    );
    Ok(())
}

/// Values and input gradients of every fused op with a hand-written
/// backward equal the plain composition's.
#[test]
fn fused_backward_equals_composed_backward() -> Result<()> {
    let dev = Device::Cpu;
    let check = |name: &str,
                 shape: (usize, usize, usize, usize),
                 fast: &dyn Fn(&Tensor) -> Result<Tensor>,
                 slow: &dyn Fn(&Tensor) -> Result<Tensor>|
     -> Result<()> {
        let x = Var::randn(0f32, 1.0, shape, &dev)?;
        let yf = fast(x.as_tensor())?;
        let ys = slow(x.as_tensor())?;
        let probe = Tensor::randn(0f32, 1.0, yf.shape(), &dev)?;
        let dv = (&yf - &ys)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(dv < 1e-5, "{name}: value diff {dv}");
        let gf = (yf * &probe)?.sum_all()?.backward()?;
        let gs = (ys * &probe)?.sum_all()?.backward()?;
        let (gf, gs) = (
            gf.get(x.as_tensor()).unwrap(),
            gs.get(x.as_tensor()).unwrap(),
        );
        let dg = (gf - gs)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(dg < 1e-4, "{name}: gradient diff {dg}");
        Ok(())
    };
    let w = Tensor::randn(1f32, 0.2, 8, &dev)?;
    check("rms_norm", (2, 3, 5, 8), &|x| rms_norm(x, &w, 1e-5), &|x| {
        rms_norm_composed(x, &w, 1e-5)
    })?;
    check("softmax", (2, 3, 5, 8), &|x| softmax_last_dim(x), &|x| {
        softmax_composed(x)
    })?;
    let cos = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
    let sin = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
    check("rope", (2, 3, 5, 8), &|x| rope(x, &cos, &sin), &|x| {
        rope_composed(x, &cos, &sin)
    })?;
    // Gate and up are the two halves of one input: both gradients checked.
    check(
        "silu_mul",
        (2, 3, 5, 8),
        &|x| silu_mul(&x.narrow(3, 0, 4)?, &x.narrow(3, 4, 4)?),
        &|x| silu_mul_composed(&x.narrow(3, 0, 4)?, &x.narrow(3, 4, 4)?),
    )?;
    // 5 queries after 3 cached keys, and a single decoding query.
    for queries in [5, 1] {
        check(
            &format!("causal_softmax ({queries} queries, 8 keys)"),
            (2, 3, queries, 8),
            &|x| causal_softmax(x, 0.37),
            &|x| causal_softmax_composed(x, 0.37),
        )?;
    }
    let targets = Tensor::new(&[3u32, 0, 7, 7, 1, 2], &dev)?;
    check(
        "cross_entropy",
        (1, 1, 6, 8),
        &|x| cross_entropy_sum(&x.reshape((6, 8))?, &targets),
        &|x| cross_entropy_sum_composed(&x.reshape((6, 8))?, &targets),
    )?;
    Ok(())
}

#[test]
fn tracked_inputs_keep_their_gradient() -> Result<()> {
    let dev = Device::Cpu;
    let v = Var::randn(0f32, 1.0, (2, 2, 3, 4), &dev)?;
    let w = Tensor::ones(4, DType::F32, &dev)?;
    let cos = Tensor::ones((3, 2), DType::F32, &dev)?;
    let sin = Tensor::zeros((3, 2), DType::F32, &dev)?;
    let y = softmax_last_dim(&rope(&rms_norm(v.as_tensor(), &w, 1e-5)?, &cos, &sin)?)?;
    let loss = y.sqr()?.sum_all()?;
    let grads = loss.backward()?;
    let g = grads
        .get(v.as_tensor())
        .expect("gradient reaches the input");
    let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
    assert!(norm > 0.0);
    Ok(())
}
