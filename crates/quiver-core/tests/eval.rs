//! The evaluation harness: multiple-choice scoring with a shared context
//! KV cache equals scoring each full sequence, WinoGrande-style partial
//! scoring, deterministic subsamples, greedy answers, and task results.

mod common;

use candle_core::{DType, Device};
use common::fixture;
use quiver_core::data::{is_bbh, is_held_out, Example};
use quiver_core::eval::{
    self, evaluate_task, generate_answer, option_pairs, score_choices, score_choices_batch,
    subsample, EvalMode, EvalOptions, EvalSplit, EvalTask,
};
use quiver_core::generate::{generate, SamplingParams};
use quiver_core::model::{load_source, ModelSource};
use quiver_core::score::{encode_pair, score_batch};
use quiver_core::LoadedModel;

fn tiny() -> LoadedModel {
    let src = ModelSource::resolve(fixture("tiny_llama").to_str().unwrap()).unwrap();
    load_source(src, &Device::Cpu, DType::F32).unwrap()
}

fn mc(task: &str, source: &str, options: &[&str], answer: usize) -> Example {
    Example {
        task: task.into(),
        source: source.into(),
        target: options[answer].into(),
        options: Some(options.iter().map(|s| s.to_string()).collect()),
        answer: Some(answer),
        scored_suffix: None,
        doc_id: None,
    }
}

#[test]
fn shared_context_scores_equal_full_sequence_scores() {
    let lm = tiny();
    let examples = [
        mc(
            "t",
            "Question: which is the largest planet in the solar system?\nAnswer:",
            &[
                "Jupiter",
                "the planet Saturn, with rings",
                "Mars",
                "a small moon",
            ],
            0,
        ),
        mc("t", "The cat sat on the", &["mat", "hat and then slept"], 1),
        // One-token options only: no second pass.
        mc("t", "Yes or no?", &[" yes", " no"], 0),
    ];
    for ex in &examples {
        let got = score_choices(&lm.model, &lm.tokenizer, ex).unwrap();
        let pairs: Vec<_> = ex
            .options
            .as_ref()
            .unwrap()
            .iter()
            .map(|o| encode_pair(&lm.tokenizer, &ex.source, &ex.continuation(o)).unwrap())
            .collect();
        let want = score_batch(&lm.model, &pairs, 8).unwrap();
        assert_eq!(got.logprobs.len(), want.len());
        for (i, (g, w)) in got.logprobs.iter().zip(&want).enumerate() {
            assert!(
                (g - w.logprob).abs() < 1e-3,
                "option {i}: shared-cache {g} vs full {}",
                w.logprob
            );
            assert_eq!(got.tokens[i], w.tokens);
        }
        // The predictions follow from the scores.
        let best = (0..want.len())
            .max_by(|&a, &b| want[a].logprob.total_cmp(&want[b].logprob))
            .unwrap();
        assert_eq!(got.pred, best);
        let best_norm = (0..want.len())
            .max_by(|&a, &b| {
                (want[a].logprob / want[a].tokens as f64)
                    .total_cmp(&(want[b].logprob / want[b].tokens as f64))
            })
            .unwrap();
        assert_eq!(got.pred_norm, best_norm);
    }
}

/// Contexts batched together (right-padded, sorted by length, several
/// batches) score what one item at a time scores: every option of
/// examples with one- and many-token options, shared and partial contexts,
/// and contexts of very different lengths.
#[test]
fn batched_contexts_score_as_one_at_a_time() {
    let lm = tiny();
    let rest = " went to the market.";
    let mut examples = vec![
        mc("t", "Yes or no?", &[" yes", " no"], 0),
        Example {
            scored_suffix: Some(rest.into()),
            ..mc(
                "winogrande:validation",
                "Anna helped Bea so",
                &[&format!("Anna{rest}"), &format!("Bea{rest}")],
                0,
            )
        },
    ];
    for i in 0..9 {
        let words = "the quick brown fox jumps over the lazy dog ".repeat(i + 1);
        examples.push(mc(
            "t",
            &format!("Question {i}: {words}?\nAnswer:"),
            &[
                "a long answer with several words",
                "no",
                "maybe so, in the end",
            ],
            i % 3,
        ));
    }
    let one: Vec<_> = examples
        .iter()
        .map(|ex| score_choices(&lm.model, &lm.tokenizer, ex).unwrap())
        .collect();
    // 64 tokens a batch: several batches of several rows, and contexts
    // longer than a batch alone.
    for budget in [64, 4096] {
        let many = score_choices_batch(&lm.model, &lm.tokenizer, &examples, budget).unwrap();
        assert_eq!(many.len(), one.len());
        for (e, (m, o)) in many.iter().zip(&one).enumerate() {
            assert_eq!(m.tokens, o.tokens, "example {e}");
            assert_eq!(m.chars, o.chars, "example {e}");
            for (a, b) in m.logprobs.iter().zip(&o.logprobs) {
                assert!(
                    (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                    "budget {budget}, example {e}: {a} vs {b}"
                );
            }
            assert_eq!(
                (m.pred, m.pred_norm, m.pred_norm_chars),
                (o.pred, o.pred_norm, o.pred_norm_chars)
            );
        }
    }
}

#[test]
fn partial_scoring_scores_only_the_shared_suffix() {
    let lm = tiny();
    let rest = " always got the easier cases.";
    let ex = Example {
        scored_suffix: Some(rest.into()),
        doc_id: None,
        ..mc(
            "winogrande:validation",
            "Sarah was a much better surgeon than Maria so",
            &[&format!("Sarah{rest}"), &format!("Maria{rest}")],
            1,
        )
    };
    ex.check().unwrap();
    let pairs = option_pairs(&lm.tokenizer, &ex).unwrap();
    for (i, name) in ["Sarah", "Maria"].iter().enumerate() {
        let want = encode_pair(
            &lm.tokenizer,
            &format!("Sarah was a much better surgeon than Maria so {name}"),
            rest,
        )
        .unwrap();
        assert_eq!(pairs[i], want, "option {i}");
    }
    let got = score_choices(&lm.model, &lm.tokenizer, &ex).unwrap();
    let want = score_batch(&lm.model, &pairs, 2).unwrap();
    for (g, w) in got.logprobs.iter().zip(&want) {
        assert!((g - w.logprob).abs() < 1e-3, "{g} vs {}", w.logprob);
    }
    // Both options are scored on the same tokens.
    assert_eq!(got.tokens[0], got.tokens[1]);
    // A suffix the options do not end with is bad data.
    let bad = Example {
        scored_suffix: Some(" never".into()),
        doc_id: None,
        ..ex.clone()
    };
    assert!(bad.check().unwrap_err().contains("scored_suffix"));
}

#[test]
fn subsample_is_deterministic_and_keeps_file_order() {
    let exs: Vec<Example> = (0..100)
        .map(|i| mc("t", &format!("q{i}"), &["a", "b"], i % 2))
        .collect();
    let a = subsample(&exs, "t", Some(10), 0);
    let b = subsample(&exs, "t", Some(10), 0);
    let c = subsample(&exs, "t", Some(10), 1);
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(a.len(), 10);
    let pos: Vec<usize> = a
        .iter()
        .map(|e| exs.iter().position(|x| x == e).unwrap())
        .collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "{pos:?}");
    assert_eq!(subsample(&exs, "t", Some(1000), 0), exs);
    assert_eq!(subsample(&exs, "t", None, 0), exs);
}

#[test]
fn greedy_answer_is_the_greedy_generation_cut_at_a_newline() {
    let lm = tiny();
    let prompt = "Q: what comes after one?\nA:";
    let ids = lm.tokenizer.encode(prompt).unwrap();
    let params = SamplingParams {
        max_tokens: 12,
        ..SamplingParams::default()
    };
    let (toks, _) = generate(&lm.model, &ids, &params, lm.tokenizer.eos_ids(), |_| Ok(())).unwrap();
    let full = lm.tokenizer.decode(&toks, true).unwrap();
    let trimmed = full.trim_start();
    let want = match trimmed.find('\n') {
        Some(i) => &trimmed[..i],
        None => trimmed,
    }
    .trim();
    let got = generate_answer(&lm.model, &lm.tokenizer, prompt, 12).unwrap();
    assert_eq!(got, want);
}

#[test]
fn task_results_count_hits_and_report_both_accuracies() {
    let lm = tiny();
    let examples: Vec<Example> = (0..6)
        .map(|i| {
            mc(
                "toy",
                &format!("Item {i}: pick one:"),
                &[" red", " a green apple", " blue"],
                i % 3,
            )
        })
        .collect();
    let task = EvalTask {
        name: "toy".into(),
        source: "test".into(),
        examples: examples.clone(),
    };
    let mut seen = 0;
    let (res, records) = evaluate_task(
        &lm.model,
        &lm.tokenizer,
        &task,
        &EvalOptions::default(),
        |_| seen += 1,
    )
    .unwrap();
    assert_eq!(seen, 6);
    assert_eq!(res.items, 6);
    assert_eq!(res.metric, "acc_norm");
    let hits = records.iter().filter(|r| r.correct).count();
    assert!((res.score - hits as f64 / 6.0).abs() < 1e-12);
    let raw = records
        .iter()
        .filter(|r| Some(r.choices.as_ref().unwrap().pred) == r.answer)
        .count();
    assert!((res.acc.unwrap() - raw as f64 / 6.0).abs() < 1e-12);
    for r in &records {
        let c = r.choices.as_ref().unwrap();
        assert_eq!(r.correct, Some(c.pred_norm) == r.answer);
        // lm-evaluation-harness's acc_norm: per character of the scored
        // continuation (" red" has 4, " a green apple" 14).
        assert_eq!(c.chars, vec![4, 14, 5]);
        let per_char: Vec<f64> = (0..3).map(|i| c.logprobs[i] / c.chars[i] as f64).collect();
        let best = (0..3).fold(0, |b, i| if per_char[i] > per_char[b] { i } else { b });
        assert_eq!(c.pred_norm_chars, best);
    }
    let by_char = records
        .iter()
        .filter(|r| Some(r.choices.as_ref().unwrap().pred_norm_chars) == r.answer)
        .count();
    assert!((res.acc_norm_chars.unwrap() - by_char as f64 / 6.0).abs() < 1e-12);
    // The options' token and character lengths disagree in ratio, so the
    // two normalisations are different rules here, not one rule twice.
    let c = records[0].choices.as_ref().unwrap();
    let ratio = |i: usize| c.tokens[i] as f64 / c.chars[i] as f64;
    assert!((ratio(0) - ratio(1)).abs() > 1e-3 || (ratio(1) - ratio(2)).abs() > 1e-3);
    // Forced generation: exact match against the target.
    let opts = EvalOptions {
        mode: Some(EvalMode::Generate),
        max_new_tokens: 4,
        limit: Some(3),
        ..EvalOptions::default()
    };
    let (res, records) = evaluate_task(&lm.model, &lm.tokenizer, &task, &opts, |_| {}).unwrap();
    assert_eq!(res.metric, "exact_match");
    assert_eq!(records.len(), 3);
    for r in &records {
        let p = r.prediction.as_ref().unwrap();
        assert_eq!(
            r.correct,
            eval::metrics::exact_match(p, r.target.as_ref().unwrap())
        );
    }
    // Multiple choice on examples without options is one clear error.
    let free = EvalTask {
        examples: vec![Example {
            options: None,
            answer: None,
            target: "x".into(),
            ..examples[0].clone()
        }],
        ..task.clone()
    };
    let opts = EvalOptions {
        mode: Some(EvalMode::MultipleChoice),
        ..EvalOptions::default()
    };
    let err = evaluate_task(&lm.model, &lm.tokenizer, &free, &opts, |_| {}).unwrap_err();
    assert!(err.to_string().contains("without options"), "{err}");
}

#[test]
fn modes_and_splits() {
    let with = [mc("x", "q", &["a", "b"], 0)];
    assert_eq!(EvalMode::for_task("x", &with), EvalMode::MultipleChoice);
    // BIG-Bench-Hard is generation even with options (METHOD.md section 4).
    assert_eq!(EvalMode::for_task("navigate", &with), EvalMode::Generate);
    assert_eq!("all".parse::<EvalSplit>().unwrap(), EvalSplit::All);
    assert!("nope".parse::<EvalSplit>().is_err());
}

#[test]
fn jsonl_tasks_resolve_through_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.jsonl");
    let mut text = String::new();
    for i in 0..20 {
        text.push_str(&format!(
            "{{\"task\": \"mine\", \"source\": \"q{i}\", \"target\": \"a\", \"options\": [\"a\", \"b\"]}}\n"
        ));
    }
    std::fs::write(&path, text).unwrap();
    let path = path.to_str().unwrap();
    let all =
        eval::resolve_tasks(&["mine".into()], EvalSplit::All, Some(path), dir.path()).unwrap();
    assert_eq!(all[0].examples.len(), 20);
    let val = eval::resolve_tasks(
        &["mine".into()],
        "validation".parse().unwrap(),
        Some(path),
        dir.path(),
    )
    .unwrap();
    assert_eq!(val[0].examples.len(), 2);
    let err =
        eval::resolve_tasks(&["other".into()], EvalSplit::All, Some(path), dir.path()).unwrap_err();
    assert!(err.to_string().contains("other"), "{err}");
}

#[test]
fn big_bench_hard_is_held_out() {
    for t in [
        "navigate",
        "logical_deduction/three_objects",
        "tracking_shuffled_objects/five_objects",
        "date_understanding",
        "bbh/word_sorting",
        "arc_easy:train",
    ] {
        assert!(is_held_out(t), "{t}");
    }
    assert!(is_bbh("logical_deduction/seven_objects"));
    for t in [
        "arithmetic/2_digit_addition",
        "cause_and_effect/one_sentence",
        "logic_grid_puzzle",
    ] {
        assert!(!is_held_out(t), "{t}");
    }
}
