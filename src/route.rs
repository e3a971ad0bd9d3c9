//! Stage 2: match a request path to a route. Pure: longest `path_prefix` wins, on path-segment
//! boundaries (`/hooks/a` matches `/hooks/a` and `/hooks/a/x`, never `/hooks/ab`).

/// The routes' prefixes, longest first, each with the index of its route in the config.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    prefixes: Vec<(String, usize)>,
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
        let mut prefixes: Vec<(String, usize)> = prefixes
            .into_iter()
            .enumerate()
            .map(|(i, p)| (p.to_string(), i))
            .collect();
        prefixes.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        RouteTable { prefixes }
    }

    /// Finds the route for `path` (the request path, without query).
    pub fn find<'p>(&self, path: &'p str) -> Option<RouteMatch<'p>> {
        self.prefixes.iter().find_map(|(prefix, index)| {
            if prefix == "/" {
                return path.starts_with('/').then_some(RouteMatch {
                    index: *index,
                    rest: path,
                });
            }
            let rest = path.strip_prefix(prefix.as_str())?;
            (rest.is_empty() || rest.starts_with('/')).then_some(RouteMatch {
                index: *index,
                rest,
            })
        })
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.prefixes.len()
    }

    /// Whether there are no routes.
    pub fn is_empty(&self) -> bool {
        self.prefixes.is_empty()
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

    #[test]
    fn root_prefix_catches_all() {
        let table = RouteTable::new(["/", "/a"]);
        assert_eq!(table.find("/a/b").map(|m| m.index), Some(1));
        assert_eq!(table.find("/b").map(|m| (m.index, m.rest)), Some((0, "/b")));
    }
}
