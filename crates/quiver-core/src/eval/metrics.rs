//! Metrics of generated answers (exact match, Rouge-L) and the standard
//! error of a mean.

const NUMBER_WORDS: [&str; 21] = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
];

/// Text normalised for exact match: surrounding whitespace and quotes
/// dropped, inner whitespace collapsed, lower case, one trailing period
/// removed, and a whole answer that is a number word from zero to twenty
/// written as digits (BIG-bench's object_counting says "four" where
/// BIG-Bench-Hard and most models say "4").
pub fn normalize_answer(s: &str) -> String {
    let collapsed = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let lower = collapsed.to_lowercase();
    let trimmed = lower.trim_matches(|c| c == '"' || c == '\'' || c == '`');
    let out = trimmed.strip_suffix('.').unwrap_or(trimmed).trim();
    match NUMBER_WORDS.iter().position(|w| *w == out) {
        Some(n) => n.to_string(),
        None => out.to_string(),
    }
}

/// Whether `prediction` equals `target` after [`normalize_answer`].
pub fn exact_match(prediction: &str, target: &str) -> bool {
    normalize_answer(prediction) == normalize_answer(target)
}

/// Lower-cased word tokens (letters and digits), as Rouge scorers use.
fn rouge_tokens(s: &str) -> Vec<String> {
    s.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// Rouge-L F-measure (beta = 1) between a prediction and a reference: the
/// longest common subsequence of their word tokens against both lengths.
/// Two empty texts score 1; one empty text scores 0.
pub fn rouge_l(prediction: &str, reference: &str) -> f64 {
    let p = rouge_tokens(prediction);
    let r = rouge_tokens(reference);
    if p.is_empty() && r.is_empty() {
        return 1.0;
    }
    if p.is_empty() || r.is_empty() {
        return 0.0;
    }
    // LCS length with one row of the DP table.
    let mut row = vec![0usize; r.len() + 1];
    for a in &p {
        let mut diag = 0;
        for (j, b) in r.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = if a == b { diag + 1 } else { up.max(row[j]) };
            diag = up;
        }
    }
    let lcs = row[r.len()] as f64;
    if lcs == 0.0 {
        return 0.0;
    }
    let precision = lcs / p.len() as f64;
    let recall = lcs / r.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// Mean and standard error of the mean (sample standard deviation over
/// sqrt(n), as lm-evaluation-harness reports it); 0 for fewer than two.
pub fn mean_stderr(xs: &[f64]) -> (f64, f64) {
    let n = xs.len();
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, (var / n as f64).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_match_normalises() {
        assert!(exact_match("  True. ", "true"));
        assert!(exact_match("\"(A)\"", "(a)"));
        assert!(exact_match("a  b\nc", "a b c"));
        assert!(!exact_match("True", "False"));
        assert!(!exact_match("12", "1"));
        assert!(exact_match("4", "four"));
        assert!(exact_match("Four.", "4"));
        assert!(!exact_match("four apples", "4"));
    }

    #[test]
    fn rouge_l_values() {
        assert_eq!(rouge_l("the cat sat", "the cat sat"), 1.0);
        assert_eq!(rouge_l("", ""), 1.0);
        assert_eq!(rouge_l("dog", ""), 0.0);
        assert_eq!(rouge_l("dog", "cat"), 0.0);
        // LCS("the cat sat on", "the dog sat") = "the sat" (2): P = 2/4, R = 2/3.
        let f = rouge_l("the cat sat on", "the dog sat");
        let want = 2.0 * 0.5 * (2.0 / 3.0) / (0.5 + 2.0 / 3.0);
        assert!((f - want).abs() < 1e-12, "{f} vs {want}");
        // Order matters: a reversed sentence shares a subsequence of 1.
        let f = rouge_l("c b a", "a b c");
        assert!((f - 1.0 / 3.0).abs() < 1e-12, "{f}");
    }

    #[test]
    fn stderr_of_a_proportion() {
        let xs = [1.0, 0.0, 1.0, 1.0];
        let (m, se) = mean_stderr(&xs);
        assert_eq!(m, 0.75);
        // sample var = 0.25, se = sqrt(0.25 / 4) = 0.25
        assert!((se - 0.25).abs() < 1e-12);
        assert_eq!(mean_stderr(&[1.0]), (1.0, 0.0));
        assert_eq!(mean_stderr(&[]), (0.0, 0.0));
    }
}
