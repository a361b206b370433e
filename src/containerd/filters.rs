//! containerd's filter syntax, as `List` calls of the content and leases services send it:
//! `labels."containerd.io/gc.root"`, `digest==sha256:…`, `id~=^ci-,labels.team!=a`. Selectors
//! joined by `,` must all hold; the filters of one request are alternatives (any may hold).
//! A field path alone asks that the field be present; `==`, `!=` compare, `~=` matches a
//! regular expression. Values may be quoted with `"` (backslash escapes) or `/…/` (regexps).

use crate::error::{Error, Result, What};

#[derive(Clone, Debug, PartialEq)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(String),
}

#[derive(Debug)]
struct Selector {
    path: Vec<String>,
    op: Op,
    re: Option<regex_lite::Regex>,
}

/// Parsed filters: any of them may match; each is a conjunction of selectors.
#[derive(Debug, Default)]
pub struct Filters(Vec<Vec<Selector>>);

/// What a filter can ask of an object: the value at a field path, if the object has it.
pub trait Fields {
    fn field(&self, path: &[String]) -> Option<String>;
}

impl Filters {
    pub fn parse(filters: &[String]) -> Result<Filters> {
        let mut out = Vec::new();
        for f in filters {
            if f.trim().is_empty() {
                continue;
            }
            out.push(
                parse_one(f).map_err(|why| {
                    Error::invalid(What::Parameter, format!("filter {f:?}: {why}"))
                })?,
            );
        }
        Ok(Filters(out))
    }

    pub fn matches(&self, obj: &dyn Fields) -> bool {
        self.0.is_empty() || self.0.iter().any(|all| all.iter().all(|s| s.matches(obj)))
    }
}

impl Selector {
    fn matches(&self, obj: &dyn Fields) -> bool {
        let v = obj.field(&self.path);
        match (&self.op, v) {
            (Op::Present, v) => v.is_some(),
            (Op::Equal(want), Some(v)) => v == *want,
            (Op::NotEqual(want), Some(v)) => v != *want,
            (Op::NotEqual(_), None) => true,
            (Op::Matches(_), Some(v)) => self.re.as_ref().is_some_and(|r| r.is_match(&v)),
            _ => false,
        }
    }
}

struct Scanner<'a> {
    s: &'a [u8],
    at: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(|c| c == b' ' || c == b'\t') {
            self.at += 1;
        }
    }

    fn quoted(&mut self, close: u8) -> Result<String, String> {
        self.at += 1;
        let mut out = Vec::new();
        while let Some(c) = self.peek() {
            self.at += 1;
            if c == close {
                return String::from_utf8(out).map_err(|_| "not UTF-8".into());
            }
            if c == b'\\' {
                match self.peek() {
                    Some(e) => {
                        self.at += 1;
                        match e {
                            b'n' => out.push(b'\n'),
                            b't' => out.push(b'\t'),
                            // A regexp keeps its escapes; a quoted string loses them.
                            e if close == b'/' && e != b'/' => out.extend_from_slice(&[b'\\', e]),
                            e => out.push(e),
                        }
                    }
                    None => break,
                }
                continue;
            }
            out.push(c);
        }
        Err(format!("unterminated {}", close as char))
    }

    fn field(&mut self) -> Result<String, String> {
        self.skip_space();
        if self.peek() == Some(b'"') {
            return self.quoted(b'"');
        }
        let start = self.at;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-' || c == b'/')
        {
            self.at += 1;
        }
        if self.at == start {
            return Err(format!("a field name was expected at offset {start}"));
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.at]).into_owned())
    }

    fn value(&mut self) -> Result<String, String> {
        self.skip_space();
        match self.peek() {
            Some(b'"') => self.quoted(b'"'),
            Some(b'/') => self.quoted(b'/'),
            _ => {
                let start = self.at;
                while self.peek().is_some_and(|c| c != b',') {
                    self.at += 1;
                }
                let v = String::from_utf8_lossy(&self.s[start..self.at])
                    .trim()
                    .to_owned();
                if v.is_empty() {
                    return Err("a value was expected".into());
                }
                Ok(v)
            }
        }
    }
}

fn parse_one(f: &str) -> Result<Vec<Selector>, String> {
    let mut sc = Scanner {
        s: f.as_bytes(),
        at: 0,
    };
    let mut out = Vec::new();
    loop {
        let mut path = vec![sc.field()?];
        while sc.peek() == Some(b'.') {
            sc.at += 1;
            path.push(sc.field()?);
        }
        sc.skip_space();
        let two = sc.s.get(sc.at..sc.at + 2);
        let op = match two {
            Some(b"==") => {
                sc.at += 2;
                Op::Equal(sc.value()?)
            }
            Some(b"!=") => {
                sc.at += 2;
                Op::NotEqual(sc.value()?)
            }
            Some(b"~=") => {
                sc.at += 2;
                Op::Matches(sc.value()?)
            }
            _ => Op::Present,
        };
        let re = match &op {
            Op::Matches(r) => {
                Some(regex_lite::Regex::new(r).map_err(|e| format!("bad regexp {r:?}: {e}"))?)
            }
            _ => None,
        };
        out.push(Selector { path, op, re });
        sc.skip_space();
        match sc.peek() {
            None => return Ok(out),
            Some(b',') => sc.at += 1,
            Some(c) => return Err(format!("unexpected {:?} at offset {}", c as char, sc.at)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Obj(HashMap<String, String>, String);

    impl Fields for Obj {
        fn field(&self, path: &[String]) -> Option<String> {
            match path {
                [f] if f == "digest" => Some(self.1.clone()),
                [l, k] if l == "labels" => self.0.get(k).cloned(),
                _ => None,
            }
        }
    }

    fn obj() -> Obj {
        let mut l = HashMap::new();
        l.insert("containerd.io/gc.root".into(), "2024".into());
        l.insert("team".into(), "a".into());
        Obj(l, "sha256:abc".into())
    }

    fn m(f: &[&str]) -> bool {
        let f: Vec<String> = f.iter().map(|s| s.to_string()).collect();
        Filters::parse(&f)
            .map(|f| f.matches(&obj()))
            .unwrap_or(false)
    }

    #[test]
    fn containerd_syntax() {
        assert!(m(&[]));
        assert!(m(&[r#"labels."containerd.io/gc.root""#]));
        assert!(!m(&[r#"labels."containerd.io/gc.other""#]));
        assert!(m(&["labels.team==a"]));
        assert!(!m(&["labels.team==b"]));
        assert!(m(&["labels.team!=b"]));
        assert!(m(&["labels.team==b", "digest==sha256:abc"]));
        assert!(!m(&["labels.team==a,digest==sha256:xyz"]));
        assert!(m(&["labels.team==a, digest~=^sha256:a"]));
        assert!(m(&[r#"digest~=/^sha256:[a-c]+$/"#]));
        assert!(m(&[r#"labels."team"=="a""#]));
        assert!(Filters::parse(&["labels.team==".into()]).is_err());
        assert!(Filters::parse(&["digest~=(".into()]).is_err());
        assert!(Filters::parse(&[r#"labels."x"#.into()]).is_err());
    }
}
