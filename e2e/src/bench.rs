//! Small helpers for benchmark programs: timed runs, medians, a side-by-side table with ratios,
//! process memory figures.

use std::time::{Duration, Instant};

/// The median of `values` (the mean of the middle two of an even count); NaN if there are
/// none.
pub fn median_of(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    match (values.len() % 2, values.get(mid)) {
        (_, None) => f64::NAN,
        (1, Some(&middle)) => middle,
        (_, Some(&upper)) => values
            .get(mid.wrapping_sub(1))
            .map_or(upper, |&lower| (lower + upper) / 2.0),
    }
}

/// A distribution-free confidence interval for the median of `values` (`confidence` between 0
/// and 1): the order statistics `x(k)` and `x(n+1-k)` with the largest `k` for which the chance
/// that the median lies between them is at least `confidence`. That chance comes from the
/// binomial distribution with p = 1/2 (each value falls below the median with even odds), so it
/// holds whatever the values' distribution. None when there are too few values for any pair
/// to reach it: for 95%, fewer than 6.
pub fn median_interval(mut values: Vec<f64>, confidence: f64) -> Option<(f64, f64)> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let tail = (1.0 - confidence) / 2.0;
    // P(B <= i) for B ~ Binomial(n, 1/2), summed term by term; each term is kept as its
    // logarithm so that 2^-n neither underflows nor the binomial coefficients overflow.
    let mut ln_term = n as f64 * 0.5f64.ln();
    let mut below = 0.0;
    let mut cut = 0;
    for i in 0..n / 2 {
        below += ln_term.exp();
        if below > tail {
            break;
        }
        cut = i + 1;
        ln_term += ((n - i) as f64).ln() - ((i + 1) as f64).ln();
    }
    if cut == 0 {
        return None;
    }
    Some((*values.get(cut - 1)?, *values.get(n - cut)?))
}

/// Each round's figure over its own baseline's (rounds paired in order), leaving out rounds
/// whose baseline is not above zero.
pub fn paired_ratios(
    values: impl IntoIterator<Item = f64>,
    baselines: impl IntoIterator<Item = f64>,
) -> Vec<f64> {
    values
        .into_iter()
        .zip(baselines)
        .filter(|(_, base)| *base > 0.0)
        .map(|(value, base)| value / base)
        .collect()
}

/// Durations of repeated runs of one contender.
#[derive(Debug, Clone)]
pub struct Samples {
    pub name: String,
    pub runs: Vec<Duration>,
}

impl Samples {
    pub fn new(name: impl Into<String>) -> Samples {
        Samples {
            name: name.into(),
            runs: Vec::new(),
        }
    }

    /// Time `f` once and keep the duration; `f`'s error aborts the benchmark.
    pub fn time<T, E>(&mut self, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let start = Instant::now();
        let out = f()?;
        self.runs.push(start.elapsed());
        Ok(out)
    }

    pub fn median(&self) -> Duration {
        let mut v = self.runs.clone();
        v.sort();
        match v.len() {
            0 => Duration::ZERO,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2,
        }
    }

    /// The value 90% of runs were at or under.
    pub fn p90(&self) -> Duration {
        self.percentile(90.0)
    }

    /// The value 99% of runs were at or under.
    pub fn p99(&self) -> Duration {
        self.percentile(99.0)
    }

    /// The value `p` percent of runs were at or under (nearest rank); zero without runs.
    pub fn percentile(&self, p: f64) -> Duration {
        let mut v = self.runs.clone();
        v.sort_unstable();
        percentile_of_sorted(&v, p)
    }

    pub fn min(&self) -> Duration {
        self.runs.iter().min().copied().unwrap_or_default()
    }
}

/// The value `p` percent of `sorted` are at or under (nearest rank); zero when empty.
pub fn percentile_of_sorted(sorted: &[Duration], p: f64) -> Duration {
    let n = sorted.len();
    if n == 0 {
        return Duration::ZERO;
    }
    let rank = (p.clamp(0.0, 100.0) * n as f64 / 100.0).ceil() as usize;
    sorted[rank.saturating_sub(1).min(n - 1)]
}

/// A memory figure of process `pid` from `/proc/PID/status` (`field`: `VmRSS`, `VmHWM`, ...),
/// in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> std::io::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path)?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{path}: no {field} figure"),
            )
        })
}

/// A table: contender, median, min, and each median relative to the first row (ours).
pub fn report(title: &str, rows: &[Samples]) -> String {
    let base = rows
        .first()
        .map(|s| s.median().as_secs_f64())
        .unwrap_or(0.0);
    let mut out = format!(
        "{title}\n{:<34} {:>10} {:>10} {:>10} {:>6}  {}\n",
        "contender", "median", "p90", "min", "runs", "median vs first row"
    );
    for s in rows {
        let m = s.median().as_secs_f64();
        let ratio = if base > 0.0 { m / base } else { 0.0 };
        out.push_str(&format!(
            "{:<34} {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>6}  {ratio:.2}x\n",
            s.name,
            m * 1e3,
            s.p90().as_secs_f64() * 1e3,
            s.min().as_secs_f64() * 1e3,
            s.runs.len()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_memory_figure_of_a_process() -> std::io::Result<()> {
        let me = std::process::id();
        assert!(proc_status_kib(me, "VmRSS")? > 0);
        assert!(proc_status_kib(me, "VmHWM")? >= proc_status_kib(me, "VmRSS")?);
        // A field name that only prefixes others (VmRSS, VmHWM...) is not one of them.
        assert!(proc_status_kib(me, "Vm").is_err());
        Ok(())
    }

    #[test]
    fn median_of_numbers() {
        assert!(median_of(Vec::new()).is_nan());
        assert_eq!(median_of(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median_of(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn median_interval_takes_the_order_statistics_the_binomial_allows() {
        let shuffled =
            |n: usize| -> Vec<f64> { (0..n).map(|i| ((i * 7) % n + 1) as f64).collect() };
        // 9 values: x(2) and x(8), 96.1% (x(3) and x(7) would be 82.0%).
        assert_eq!(median_interval(shuffled(9), 0.95), Some((2.0, 8.0)));
        // 6 values: only the extremes reach 95% (96.9%); 5 values cannot (93.8%).
        assert_eq!(median_interval(shuffled(6), 0.95), Some((1.0, 6.0)));
        assert_eq!(median_interval(shuffled(5), 0.95), None);
        assert_eq!(median_interval(Vec::new(), 0.95), None);
        // 15 values: x(4) and x(12), 96.5%.
        assert_eq!(median_interval(shuffled(15), 0.95), Some((4.0, 12.0)));
        // Many values: close around the middle, and no overflow or underflow on the way.
        let (lo, hi) = median_interval(shuffled(2001), 0.95).unwrap_or_default();
        assert!(
            lo > 940.0 && lo < 1001.0 && hi > 1001.0 && hi < 1062.0,
            "{lo} {hi}"
        );
    }

    #[test]
    fn paired_ratios_skip_rounds_without_a_baseline() {
        assert_eq!(
            paired_ratios([3.0, 5.0, 8.0], [2.0, 0.0, 4.0]),
            vec![1.5, 2.0]
        );
    }

    #[test]
    fn median_of_odd_and_even() {
        let mut s = Samples::new("x");
        s.runs = [3, 1, 2].map(Duration::from_millis).to_vec();
        assert_eq!(s.median(), Duration::from_millis(2));
        s.runs.push(Duration::from_millis(10));
        assert_eq!(s.median(), Duration::from_micros(2500));
        assert_eq!(s.min(), Duration::from_millis(1));
        s.runs = (1..=10).map(Duration::from_millis).collect();
        assert_eq!(s.p90(), Duration::from_millis(9));
        s.runs = (1..=200).map(Duration::from_millis).collect();
        assert_eq!(s.p99(), Duration::from_millis(198));
        assert_eq!(s.percentile(50.0), Duration::from_millis(100));
        assert_eq!(s.percentile(100.0), Duration::from_millis(200));
    }
}
