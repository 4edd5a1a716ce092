//! Label-free agreement: how many sampled answers say the same thing.

/// The most common answer among `preds`, answers that [`is_equivalent`](crate::is_equivalent)
/// counting as one (a response without an answer counts for none), with the number of samples that
/// gave it. Ties: the answer seen first.
pub fn plurality(preds: &[Option<String>]) -> Option<(String, usize)> {
    let mut groups: Vec<(&str, usize)> = vec![];
    for p in preds.iter().flatten() {
        let same = |g: &&mut (&str, usize)| {
            g.0 == p.as_str() || crate::is_equivalent(p, g.0) || crate::is_equivalent(g.0, p)
        };
        match groups.iter_mut().find(same) {
            Some(g) => g.1 += 1,
            None => groups.push((p.as_str(), 1)),
        }
    }
    groups
        .into_iter()
        .fold(None, |best: Option<(&str, usize)>, g| match best {
            Some(b) if b.1 >= g.1 => Some(b),
            _ => Some(g),
        })
        .map(|(a, n)| (a.to_string(), n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preds(xs: &[Option<&str>]) -> Vec<Option<String>> {
        xs.iter().map(|x| x.map(String::from)).collect()
    }

    #[test]
    fn equivalent_answers_count_together() {
        let p = preds(&[
            Some("1/2"),
            Some("3"),
            Some("0.5"),
            None,
            Some("\\frac{1}{2}"),
            None,
        ]);
        assert_eq!(plurality(&p), Some(("1/2".to_string(), 3)));
        // Missing answers are never a plurality, however many.
        let p = preds(&[None, None, None, Some("7")]);
        assert_eq!(plurality(&p), Some(("7".to_string(), 1)));
        assert_eq!(plurality(&preds(&[None, None])), None);
        // Ties: the first seen.
        assert_eq!(
            plurality(&preds(&[Some("4"), Some("5"), Some("5"), Some("4")])),
            Some(("4".to_string(), 2))
        );
    }
}
