//! Where each value sits in a YAML file. serde tells us the location of syntax and type
//! errors, but semantic checks (an unknown backend, a duplicate name) happen after
//! deserialization. This index maps a path such as `routes[2].backend` to its line and
//! column so those errors can name file:line:col too. yaml-rust2's marked event stream is
//! used because serde_yaml_ng does not expose node positions.

use std::collections::HashMap;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Line and column, both starting at 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

#[derive(Debug, Default, Clone)]
pub struct SpanIndex {
    map: HashMap<String, Pos>,
    duplicates: Vec<(String, Pos)>,
}

impl SpanIndex {
    pub fn build(text: &str) -> SpanIndex {
        let mut b = Builder::default();
        let mut parser = Parser::new_from_str(text);
        // A syntax error is reported by serde with its own location; the index is best effort.
        let _ = parser.load(&mut b, false);
        SpanIndex {
            map: b.map,
            duplicates: b.duplicates,
        }
    }

    /// Keys given a second time in one mapping, by path, where the second one is. A JSON
    /// parser keeps the last silently (serde_json does), so whoever reads a JSON file that a
    /// person wrote refuses these.
    pub fn duplicates(&self) -> &[(String, Pos)] {
        &self.duplicates
    }

    /// What to say of a key at `path` given twice.
    pub fn duplicate_message(path: &str) -> String {
        format!("`{path}` is given twice: a key may appear once in an object (a JSON parser would keep only the last); remove or rename one")
    }

    /// The position of `path`, or of its nearest ancestor that has one.
    pub fn pos(&self, path: &str) -> Pos {
        let mut p = path.to_string();
        loop {
            if let Some(pos) = self.map.get(&p) {
                return *pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p.truncate(i),
                None => return self.map.get("").copied().unwrap_or(Pos { line: 1, col: 1 }),
            }
        }
    }
}

enum Frame {
    Map {
        path: String,
        key: Option<String>,
        /// No key seen yet.
        first: bool,
        /// The keys seen so far.
        seen: std::collections::HashSet<String>,
    },
    Seq {
        path: String,
        idx: usize,
    },
}

#[derive(Default)]
struct Builder {
    map: HashMap<String, Pos>,
    duplicates: Vec<(String, Pos)>,
    stack: Vec<Frame>,
}

impl Builder {
    fn child_path(&self) -> String {
        match self.stack.last() {
            Some(Frame::Map {
                path, key: Some(k), ..
            }) if path.is_empty() => k.clone(),
            Some(Frame::Map {
                path, key: Some(k), ..
            }) => format!("{path}.{k}"),
            Some(Frame::Map {
                path, key: None, ..
            }) => path.clone(),
            Some(Frame::Seq { path, idx }) => format!("{path}[{idx}]"),
            None => String::new(),
        }
    }

    fn advance(&mut self) {
        match self.stack.last_mut() {
            Some(Frame::Map { key, .. }) => *key = None,
            Some(Frame::Seq { idx, .. }) => *idx += 1,
            None => {}
        }
    }

    fn record(&mut self, path: String, m: Marker) {
        self.map.insert(
            path,
            Pos {
                line: m.line(),
                col: m.col() + 1,
            },
        );
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(v, ..) => {
                if let Some(Frame::Map {
                    path,
                    key: k @ None,
                    first,
                    seen,
                }) = self.stack.last_mut()
                {
                    let again = !seen.insert(v.clone());
                    *k = Some(v);
                    // A block mapping's start event is marked where its first key ends (at
                    // the `:`); the mapping starts at that key.
                    let starts_here = std::mem::take(first).then(|| path.clone());
                    if let Some(path) = starts_here {
                        let at = (mark.line(), mark.col() + 1);
                        if self.map.get(&path).is_some_and(|p| at < (p.line, p.col)) {
                            self.record(path, mark);
                        }
                    }
                    let p = self.child_path();
                    if again {
                        let at = Pos {
                            line: mark.line(),
                            col: mark.col() + 1,
                        };
                        self.duplicates.push((p.clone(), at));
                    }
                    self.record(p, mark);
                } else {
                    let p = self.child_path();
                    self.record(p, mark);
                    self.advance();
                }
            }
            Event::Alias(_) => {
                let p = self.child_path();
                self.record(p, mark);
                self.advance();
            }
            Event::MappingStart(..) => {
                let p = self.child_path();
                self.record(p.clone(), mark);
                self.stack.push(Frame::Map {
                    path: p,
                    key: None,
                    first: true,
                    seen: Default::default(),
                });
            }
            Event::SequenceStart(..) => {
                let p = self.child_path();
                self.record(p.clone(), mark);
                self.stack.push(Frame::Seq { path: p, idx: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.advance();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_have_positions() {
        let y = "a: 1\nroutes:\n  - name: x\n    backend: nope\n  - { name: y, backend: b }\n";
        let idx = SpanIndex::build(y);
        assert_eq!(idx.pos("a"), Pos { line: 1, col: 4 });
        assert_eq!(idx.pos("routes[0].backend"), Pos { line: 4, col: 14 });
        assert_eq!(idx.pos("routes[1].backend").line, 5);
        // Unknown paths fall back to the nearest ancestor.
        assert_eq!(idx.pos("routes[0].missing.deep").line, 3);
    }

    #[test]
    fn keys_given_twice_in_one_mapping_are_found() {
        let j = "{\"States\": {\"A\": {\"Type\": \"Pass\"},\n  \"A\": {\"Type\": \"Fail\"}},\n \"x\": [{\"k\": 1}, {\"k\": 2}]}";
        let idx = SpanIndex::build(j);
        assert_eq!(
            idx.duplicates(),
            [("States.A".to_string(), Pos { line: 2, col: 3 })]
        );
        assert!(SpanIndex::build("a: 1\nb: {a: 2}\n")
            .duplicates()
            .is_empty());
    }

    #[test]
    fn a_mapping_starts_at_its_first_key_or_brace() {
        let y = "name: x\nroutes:\n  - name: a\n    match:\n      host: h\n  - { name: b }\n";
        let idx = SpanIndex::build(y);
        assert_eq!(idx.pos(""), Pos { line: 1, col: 1 });
        assert_eq!(idx.pos("routes[0]"), Pos { line: 3, col: 5 });
        assert_eq!(idx.pos("routes[0].match"), Pos { line: 5, col: 7 });
        assert_eq!(idx.pos("routes[1]"), Pos { line: 6, col: 5 });
    }
}
