//! Stage 2: match a request path to a route. Pure: longest `path_prefix` wins, on path-segment
//! boundaries (`/hooks/a` matches `/hooks/a` and `/hooks/a/x`, never `/hooks/ab`).

use std::collections::HashMap;

/// Tables of up to this many prefixes (besides `/`) are scanned; larger ones are hashed. A
/// scan of one prefix takes about 6 ns, a hashed lookup about 20 ns per path segment tried.
pub const LINEAR_UP_TO: usize = 8;

/// The routes' prefixes, each with the index of its route in the config.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    /// Small tables: the prefixes longest first (the first route among equals first).
    sorted: Vec<(String, usize)>,
    /// Larger tables: prefix → route index (the first route, for a prefix named twice).
    by_prefix: HashMap<String, usize>,
    /// The route of the root prefix `/`, if any.
    root: Option<usize>,
    len: usize,
}

/// A matched route: its index in the config and the rest of the path after the prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteMatch<'p> {
    /// Index of the route in `Config::routes`.
    pub index: usize,
    /// The path after the prefix: empty, or starting with `/`.
    pub rest: &'p str,
}

impl RouteTable {
    /// Builds the table from normalised prefixes (no trailing `/` except the root `/`).
    pub fn new<'a>(prefixes: impl IntoIterator<Item = &'a str>) -> RouteTable {
        let mut table = RouteTable::default();
        for (index, prefix) in prefixes.into_iter().enumerate() {
            table.len += 1;
            if prefix == "/" {
                table.root.get_or_insert(index);
            } else {
                table.sorted.push((prefix.to_string(), index));
            }
        }
        if table.sorted.len() > LINEAR_UP_TO {
            for (prefix, index) in table.sorted.drain(..) {
                table.by_prefix.entry(prefix).or_insert(index);
            }
        } else {
            table
                .sorted
                .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        }
        table
    }

    /// Finds the route for `path` (the request path, without query).
    ///
    /// Up to [`LINEAR_UP_TO`] prefixes, tries them longest first. Beyond, looks up the path
    /// itself, then the path cut at each `/` from the right: the first hit is the longest
    /// prefix on a segment boundary, at a cost that grows with the path's segments, not with
    /// the number of routes (`cargo bench --bench hot_paths`).
    pub fn find<'p>(&self, path: &'p str) -> Option<RouteMatch<'p>> {
        if !path.starts_with('/') {
            return None;
        }
        if self.by_prefix.is_empty() {
            let found = self.sorted.iter().find_map(|(prefix, index)| {
                let rest = path.strip_prefix(prefix.as_str())?;
                (rest.is_empty() || rest.starts_with('/')).then_some(RouteMatch {
                    index: *index,
                    rest,
                })
            });
            return found.or(self.root.map(|index| RouteMatch { index, rest: path }));
        }
        let mut end = path.len();
        while end > 0 {
            let candidate = &path[..end];
            if let Some(&index) = self.by_prefix.get(candidate) {
                return Some(RouteMatch {
                    index,
                    rest: &path[end..],
                });
            }
            end = candidate.rfind('/').unwrap_or(0);
        }
        self.root.map(|index| RouteMatch { index, rest: path })
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no routes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let table = RouteTable::new(["/hooks", "/hooks/a", "/hooks/a/b"]);
        let find = |p| table.find(p).map(|m| (m.index, m.rest));
        assert_eq!(find("/hooks/a"), Some((1, "")));
        assert_eq!(find("/hooks/a/x"), Some((1, "/x")));
        assert_eq!(find("/hooks/a/b/c"), Some((2, "/c")));
        assert_eq!(find("/hooks/ab"), Some((0, "/ab")));
        assert_eq!(find("/hooksx"), None);
        assert_eq!(find("/other"), None);
    }

    /// The definition: every prefix that matches on a segment boundary, the longest wins, the
    /// first route among equals.
    fn reference<'p>(prefixes: &[String], path: &'p str) -> Option<(usize, &'p str)> {
        let mut best: Option<(usize, usize, &'p str)> = None;
        for (i, p) in prefixes.iter().enumerate() {
            let rest = if p == "/" {
                path.starts_with('/').then_some(path)
            } else {
                path.strip_prefix(p.as_str())
                    .filter(|r| r.is_empty() || r.starts_with('/'))
            };
            let len = if p == "/" { 0 } else { p.len() };
            if let Some(rest) = rest
                && best.is_none_or(|(l, _, _)| len > l)
            {
                best = Some((len, i, rest));
            }
        }
        best.map(|(_, i, rest)| (i, rest))
    }

    proptest::proptest! {
        #[test]
        fn matches_the_longest_prefix_definition(
            prefixes in proptest::collection::vec(
                proptest::collection::vec("a|b|ab|", 0..4), 1..12),
            path in proptest::collection::vec("a|b|ab|", 0..6),
        ) {
            let prefixes: Vec<String> =
                prefixes.iter().map(|segs| format!("/{}", segs.join("/"))).map(|p| {
                    if p.len() > 1 { p.trim_end_matches('/').to_string() } else { p }
                }).map(|p| if p.is_empty() { "/".to_string() } else { p }).collect();
            let path = format!("/{}", path.join("/"));
            let table = RouteTable::new(prefixes.iter().map(String::as_str));
            proptest::prop_assert_eq!(
                table.find(&path).map(|m| (m.index, m.rest)),
                reference(&prefixes, &path),
                "prefixes {:?} path {:?}", prefixes, path
            );
        }
    }

    #[test]
    fn root_prefix_catches_all() {
        let table = RouteTable::new(["/", "/a"]);
        assert_eq!(table.find("/a/b").map(|m| m.index), Some(1));
        assert_eq!(table.find("/b").map(|m| (m.index, m.rest)), Some((0, "/b")));
    }
}
