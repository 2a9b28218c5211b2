//! Name conversions for generated payload keys.

/// `order_item` / `order-item` / `orderItem` → `orderItem`.
pub(crate) fn lower_camel(s: &str) -> String {
    let upper = upper_camel(s);
    let mut chars = upper.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// `unit_price` → `UnitPrice`.
pub(crate) fn upper_camel(s: &str) -> String {
    s.split(['_', '-', ' ', '.'])
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut c = w.chars();
            match c.next() {
                Some(f) => f.to_uppercase().chain(c).collect::<String>(),
                None => String::new(),
            }
        })
        .collect()
}

/// Levenshtein distance, for "did you mean" suggestions.
pub(crate) fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The candidate closest to `name`, when it is close enough to be a likely typo.
pub(crate) fn closest<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (distance(name, c), c))
        .filter(|(d, c)| *d <= (c.len().max(name.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn camel_cases() {
        assert_eq!(lower_camel("product"), "product");
        assert_eq!(lower_camel("order_item"), "orderItem");
        assert_eq!(upper_camel("stock"), "Stock");
        assert_eq!(upper_camel("unit_price"), "UnitPrice");
    }

    #[test]
    fn suggestions() {
        assert_eq!(closest("stok", ["id", "name", "stock"]), Some("stock"));
        assert_eq!(closest("evnt", ["event", "on", "watch"]), Some("event"));
        assert_eq!(closest("zzzz", ["id", "name", "stock"]), None);
    }
}
