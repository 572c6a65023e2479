//! Statistics of measured samples, as every scenario reports them.

/// The `q` quantile (0..=1) of ascending `sorted` samples, by nearest rank
/// (0 when there are none).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize]
}

/// Round to `digits` decimals for readable JSON.
pub fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_takes_the_nearest_rank() {
        let s: Vec<f64> = (1..=101).map(f64::from).collect();
        assert_eq!(percentile(&s, 0.0), 1.0);
        assert_eq!(percentile(&s, 0.5), 51.0);
        assert_eq!(percentile(&s, 0.99), 100.0);
        assert_eq!(percentile(&s, 1.0), 101.0);
        assert_eq!(percentile(&s, 7.0), 101.0, "clamped");
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn round_keeps_the_digits_asked_for() {
        assert_eq!(round(1.23456, 2), 1.23);
        assert_eq!(round(-0.055, 1), -0.1);
        assert_eq!(round(12.5, 0), 13.0);
    }
}
