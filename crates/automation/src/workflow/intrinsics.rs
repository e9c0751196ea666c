//! The `States.*` intrinsic functions of the Amazon States Language (JSONPath mode), as AWS
//! Step Functions documents them: [`eval`] evaluates a call such as
//! `States.Format('Hello, {}', $.name)`, and [`check`] validates one at load.
//!
//! No crate parses the ASL intrinsic call syntax, so this file has a small hand-written
//! tokenizer and recursive-descent parser for the call syntax only: function names,
//! parentheses, commas, string literals in single quotes (escapes `\'`, `\{`, `\}`, `\\`),
//! numbers, `true`, `false`, `null`, paths and nested calls. A path argument is only
//! delimited here (up to the next top-level `,` or `)`); it is validated and evaluated by
//! [`paths`], which uses `serde_json_path`.
//!
//! Deviations from Step Functions: `States.Hash` does not support `MD5` (no MD5 crate in
//! the workspace); `States.MathRandom` with a seed is reproducible here but draws other
//! numbers than AWS's Java generator; `States.ArrayRange` also counts down with a negative
//! step.

use super::{names, paths, Scope, StatesError};
use base64::Engine as _;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Map, Number, Value};
use sha1::Digest as _;

/// How deep intrinsic calls may nest (as Step Functions).
const MAX_NESTING: usize = 10;
/// The most elements `States.ArrayRange` may produce.
const MAX_RANGE: i64 = 1000;
/// The longest string `States.Base64Encode`, `States.Base64Decode` and `States.Hash` take.
const MAX_CODEC_INPUT: usize = 10_000;

/// The functions: name, fewest and most arguments (`None`: no limit).
const FUNCTIONS: &[(&str, usize, Option<usize>)] = &[
    ("States.Format", 1, None),
    ("States.StringToJson", 1, Some(1)),
    ("States.JsonToString", 1, Some(1)),
    ("States.Array", 0, None),
    ("States.ArrayPartition", 2, Some(2)),
    ("States.ArrayContains", 2, Some(2)),
    ("States.ArrayRange", 3, Some(3)),
    ("States.ArrayGetItem", 2, Some(2)),
    ("States.ArrayLength", 1, Some(1)),
    ("States.ArrayUnique", 1, Some(1)),
    ("States.Base64Encode", 1, Some(1)),
    ("States.Base64Decode", 1, Some(1)),
    ("States.Hash", 2, Some(2)),
    ("States.JsonMerge", 3, Some(3)),
    ("States.MathRandom", 2, Some(3)),
    ("States.MathAdd", 2, Some(2)),
    ("States.StringSplit", 2, Some(2)),
    ("States.UUID", 0, Some(0)),
];

/// The hash algorithms of `States.Hash`, and whether this build supports each.
const ALGORITHMS: &[(&str, bool)] = &[
    ("MD5", false),
    ("SHA-1", true),
    ("SHA-256", true),
    ("SHA-384", true),
    ("SHA-512", true),
];

/// An argument of a call, as written.
#[derive(Clone, Debug, PartialEq)]
enum Arg {
    /// A string literal: its text between the quotes, escapes still in place (Format needs
    /// to tell `{}` from `\{\}`).
    Str(String),
    Num(Number),
    Bool(bool),
    Null,
    /// A path (`$…`, `$$…`, `$var…`).
    Path(String),
    Call(Call),
}

/// A call: the function's name and its arguments.
#[derive(Clone, Debug, PartialEq)]
struct Call {
    name: String,
    args: Vec<Arg>,
}

/// The parser over an expression; `pos` is a byte offset into `src`.
struct Parser<'a> {
    src: &'a str,
    pos: usize,
    depth: usize,
}

impl<'a> Parser<'a> {
    /// Parses a whole expression: one call and nothing after it.
    fn parse(src: &'a str) -> Result<Call, String> {
        let mut p = Parser {
            src,
            pos: 0,
            depth: 0,
        };
        p.skip_ws();
        let call = p.call()?;
        p.skip_ws();
        match p.peek() {
            None => Ok(call),
            Some(c) => Err(p.error(&format!("unexpected `{c}` after the end of the call"))),
        }
    }

    fn peek(&self) -> Option<char> {
        self.src[self.pos..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.bump();
        }
    }

    /// A message about the current position.
    fn error(&self, what: &str) -> String {
        format!(
            "`{}`: at character {}: {what}",
            self.src,
            self.src[..self.pos].chars().count() + 1
        )
    }

    /// A run of name characters (letters, digits, `_`, `.`).
    fn word(&mut self) -> &'a str {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.')
        {
            self.bump();
        }
        &self.src[start..self.pos]
    }

    /// `States.Name(arg, …)`.
    fn call(&mut self) -> Result<Call, String> {
        let start = self.pos;
        let name = self.word();
        if name.is_empty() {
            return Err(self.error("expected an intrinsic function such as `States.Format(…)`"));
        }
        if !FUNCTIONS.iter().any(|(n, ..)| *n == name) {
            self.pos = start;
            return Err(self.error(&format!(
                "unknown intrinsic function `{name}`; the functions are {}",
                FUNCTIONS
                    .iter()
                    .map(|(n, ..)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(self.error(&format!("intrinsic calls nest at most {MAX_NESTING} deep")));
        }
        self.skip_ws();
        if self.bump() != Some('(') {
            return Err(self.error(&format!("expected `(` after `{name}`")));
        }
        let args = self.args()?;
        self.depth -= 1;
        Ok(Call {
            name: name.to_string(),
            args,
        })
    }

    /// The arguments after `(`, through the closing `)`.
    fn args(&mut self) -> Result<Vec<Arg>, String> {
        let mut args = Vec::new();
        self.skip_ws();
        if self.peek() == Some(')') {
            self.bump();
            return Ok(args);
        }
        loop {
            self.skip_ws();
            args.push(self.arg()?);
            self.skip_ws();
            match self.bump() {
                Some(',') => continue,
                Some(')') => return Ok(args),
                Some(c) => return Err(self.error(&format!("expected `,` or `)`, found `{c}`"))),
                None => return Err(self.error("missing `)` at the end")),
            }
        }
    }

    /// One argument.
    fn arg(&mut self) -> Result<Arg, String> {
        match self.peek() {
            Some('\'') => self.string().map(Arg::Str),
            Some('$') => self.path().map(Arg::Path),
            Some(c) if c == '-' || c.is_ascii_digit() => self.number().map(Arg::Num),
            Some(c) if c.is_alphabetic() => {
                let start = self.pos;
                match self.word() {
                    "true" => Ok(Arg::Bool(true)),
                    "false" => Ok(Arg::Bool(false)),
                    "null" => Ok(Arg::Null),
                    _ => {
                        self.pos = start;
                        self.call().map(Arg::Call)
                    }
                }
            }
            Some(c) => Err(self.error(&format!(
                "expected an argument (a 'string', a number, true, false, null, a path `$…` or \
                 a call `States.…(…)`), found `{c}`"
            ))),
            None => Err(self.error("missing `)` at the end")),
        }
    }

    /// A string literal; returns its text between the quotes with escapes still in place.
    fn string(&mut self) -> Result<String, String> {
        self.bump(); // the opening quote
        let start = self.pos;
        loop {
            match self.bump() {
                Some('\'') => return Ok(self.src[start..self.pos - 1].to_string()),
                Some('\\') => match self.bump() {
                    Some('\'' | '{' | '}' | '\\') => {}
                    Some(c) => {
                        return Err(self.error(&format!(
                            "unknown escape `\\{c}` in a string: the escapes are \\' \\{{ \\}} \\\\"
                        )))
                    }
                    None => return Err(self.error("unterminated string: add the closing `'`")),
                },
                Some(_) => {}
                None => return Err(self.error("unterminated string: add the closing `'`")),
            }
        }
    }

    /// A path: everything up to the next `,` or `)` outside brackets, parentheses and quotes.
    fn path(&mut self) -> Result<String, String> {
        let start = self.pos;
        let (mut depth, mut quote) = (0usize, None::<char>);
        while let Some(c) = self.peek() {
            match (quote, c) {
                (Some(_), '\\') => {
                    self.bump();
                }
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '\'' | '"') => quote = Some(c),
                (None, '[' | '(') => depth += 1,
                (None, ']' | ')') if depth > 0 => depth -= 1,
                (None, ',' | ')') => break,
                _ => {}
            }
            self.bump();
        }
        let path = self.src[start..self.pos].trim_end();
        paths::check_path(path).map_err(|e| {
            let pos = self.pos;
            self.pos = start;
            let message = self.error(&e);
            self.pos = pos;
            message
        })?;
        Ok(path.to_string())
    }

    /// A number literal (JSON number syntax).
    fn number(&mut self) -> Result<Number, String> {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_digit() || "+-.eE".contains(c))
        {
            self.bump();
        }
        let text = &self.src[start..self.pos];
        serde_json::from_str::<Number>(text).map_err(|_| {
            self.pos = start;
            self.error(&format!("`{text}` is not a number"))
        })
    }
}

/// One piece of a Format template.
#[derive(Debug, PartialEq)]
enum Piece {
    Text(String),
    Hole,
}

/// The pieces of a Format template written as a literal (escapes in place): `{}` is a hole,
/// `\{`, `\}`, `\'`, `\\` are the characters themselves, a lone brace is an error.
fn template_pieces(raw: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => text.extend(chars.next()),
            '{' if chars.peek() == Some(&'}') => {
                chars.next();
                pieces.push(Piece::Text(std::mem::take(&mut text)));
                pieces.push(Piece::Hole);
            }
            '{' | '}' => {
                return Err(format!(
                    "States.Format: a lone `{c}` in '{raw}'; write `{{}}` for a value, or \
                     `\\{c}` for the character"
                ))
            }
            c => text.push(c),
        }
    }
    pieces.push(Piece::Text(text));
    Ok(pieces)
}

/// The pieces of a Format template that comes from a path or a call (no escapes).
fn dynamic_pieces(template: &str) -> Vec<Piece> {
    let mut pieces = Vec::new();
    for (i, text) in template.split("{}").enumerate() {
        if i > 0 {
            pieces.push(Piece::Hole);
        }
        pieces.push(Piece::Text(text.to_string()));
    }
    pieces
}

/// A string literal's value: its escapes replaced by the characters.
fn unescape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

/// Evaluates an intrinsic function call such as `States.Format('Hello, {}', $.name)`.
///
/// Arguments are string literals in single quotes (escapes `\'`, `\{`, `\}`, `\\`),
/// numbers, `true`, `false`, `null`, paths (`$…`, `$$…`, `$var…`, read with
/// [`paths::select`]) and nested calls. Every error (syntax, unknown function, a path that
/// selects nothing, a wrong argument type, a limit) is `States.IntrinsicFailure` with a
/// cause that says what went wrong.
pub fn eval(expr: &str, scope: &Scope) -> Result<Value, StatesError> {
    let fail = |cause: String| StatesError::new(names::INTRINSIC_FAILURE, cause);
    let call = Parser::parse(expr).map_err(fail)?;
    check_call(&call).map_err(fail)?;
    eval_call(&call, scope).map_err(fail)
}

/// Parses `expr` without evaluating it (validation at load): syntax, unknown functions,
/// argument counts, the paths in it, a literal Format template's holes against its values,
/// a literal `States.Hash` algorithm and `States.JsonMerge`'s literal third argument.
pub fn check(expr: &str) -> Result<(), String> {
    check_call(&Parser::parse(expr)?)
}

/// The static checks of `call` and the calls nested in it.
fn check_call(call: &Call) -> Result<(), String> {
    let name = call.name.as_str();
    let (_, min, max) = FUNCTIONS
        .iter()
        .find(|(n, ..)| *n == name)
        .copied()
        .unwrap_or_default();
    let n = call.args.len();
    if n < min || max.is_some_and(|max| n > max) {
        let wanted = match max {
            None => format!("at least {min}"),
            Some(max) if max == min => format!("{min}"),
            Some(max) => format!("{min} to {max}"),
        };
        return Err(format!("{name} takes {wanted} argument(s), not {n}"));
    }
    match (name, call.args.as_slice()) {
        ("States.Format", [Arg::Str(raw), values @ ..]) => {
            let holes = template_pieces(raw)?
                .iter()
                .filter(|p| **p == Piece::Hole)
                .count();
            if holes != values.len() {
                return Err(format!(
                    "States.Format: the template '{raw}' has {holes} `{{}}` but {} value(s) follow",
                    values.len()
                ));
            }
        }
        ("States.Hash", [_, Arg::Str(raw)]) => {
            algorithm(&unescape(raw))?;
        }
        ("States.JsonMerge", [_, _, Arg::Bool(true)]) => return Err(deep_merge_error()),
        _ => {}
    }
    call.args.iter().try_for_each(|a| match a {
        Arg::Call(inner) => check_call(inner),
        _ => Ok(()),
    })
}

/// The value of an argument.
fn eval_arg(arg: &Arg, scope: &Scope) -> Result<Value, String> {
    match arg {
        Arg::Str(raw) => Ok(Value::String(unescape(raw))),
        Arg::Num(n) => Ok(Value::Number(n.clone())),
        Arg::Bool(b) => Ok(Value::Bool(*b)),
        Arg::Null => Ok(Value::Null),
        Arg::Path(p) => paths::select(p, scope).map_err(|e| e.cause),
        Arg::Call(call) => eval_call(call, scope),
    }
}

/// The value of a call.
fn eval_call(call: &Call, scope: &Scope) -> Result<Value, String> {
    let args = call
        .args
        .iter()
        .map(|a| eval_arg(a, scope))
        .collect::<Result<Vec<_>, _>>()?;
    match call.name.as_str() {
        "States.Format" => string_format(&call.args[0], &args),
        "States.StringToJson" => string_to_json(&args[0]),
        "States.JsonToString" => Ok(Value::String(args[0].to_string())),
        "States.Array" => Ok(Value::Array(args)),
        "States.ArrayPartition" => array_partition(&args[0], &args[1]),
        "States.ArrayContains" => Ok(Value::Bool(array(&call.name, &args[0])?.contains(&args[1]))),
        "States.ArrayRange" => array_range(&args),
        "States.ArrayGetItem" => array_get_item(&args[0], &args[1]),
        "States.ArrayLength" => Ok(Value::from(array(&call.name, &args[0])?.len())),
        "States.ArrayUnique" => array_unique(&args[0]),
        "States.Base64Encode" => base64_encode(&args[0]),
        "States.Base64Decode" => base64_decode(&args[0]),
        "States.Hash" => hash(&args[0], &args[1]),
        "States.JsonMerge" => json_merge(&args),
        "States.MathRandom" => math_random(&args),
        "States.MathAdd" => math_add(&args[0], &args[1]),
        "States.StringSplit" => string_split(&args[0], &args[1]),
        "States.UUID" => Ok(Value::String(uuid::Uuid::new_v4().to_string())),
        other => Err(format!("unknown intrinsic function `{other}`")),
    }
}

/// A value's JSON type with an article, for messages.
fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `v` as an array, or an error naming the function.
fn array<'v>(function: &str, v: &'v Value) -> Result<&'v Vec<Value>, String> {
    v.as_array()
        .ok_or_else(|| format!("{function}: expected an array, got {}", kind_of(v)))
}

/// `v` as a string, or an error naming the function and the argument.
fn string<'v>(function: &str, what: &str, v: &'v Value) -> Result<&'v str, String> {
    v.as_str()
        .ok_or_else(|| format!("{function}: {what} must be a string, got {}", kind_of(v)))
}

/// `v` as an integer. A non-integer number is rounded half up when `round` (as Step
/// Functions does for MathAdd, MathRandom and ArrayRange), else an error.
fn integer(function: &str, what: &str, v: &Value, round: bool) -> Result<i64, String> {
    let bad = || format!("{function}: {what} must be an integer, got {v}");
    let Value::Number(n) = v else {
        return Err(bad());
    };
    if let Some(i) = n.as_i64() {
        return Ok(i);
    }
    let f = n
        .as_f64()
        .filter(|f| f.is_finite() && f.abs() < 9.0e15)
        .ok_or_else(bad)?;
    if f.fract() == 0.0 {
        Ok(f as i64)
    } else if round {
        Ok((f + 0.5).floor() as i64)
    } else {
        Err(bad())
    }
}

/// `v` as a 32-bit integer (MathAdd and MathRandom take those).
fn int32(function: &str, what: &str, v: &Value) -> Result<i64, String> {
    let i = integer(function, what, v, true)?;
    if i32::try_from(i).is_err() {
        return Err(format!(
            "{function}: {what} must be between -2147483648 and 2147483647, got {i}"
        ));
    }
    Ok(i)
}

/// States.Format: the template with each `{}` replaced by the next value.
fn string_format(template: &Arg, args: &[Value]) -> Result<Value, String> {
    let pieces = match (template, &args[0]) {
        (Arg::Str(raw), _) => template_pieces(raw)?,
        (_, Value::String(s)) => dynamic_pieces(s),
        (_, other) => {
            return Err(format!(
                "States.Format: the template must be a string, got {}",
                kind_of(other)
            ))
        }
    };
    let values = &args[1..];
    let holes = pieces.iter().filter(|p| **p == Piece::Hole).count();
    if holes != values.len() {
        return Err(format!(
            "States.Format: the template has {holes} `{{}}` but {} value(s) follow",
            values.len()
        ));
    }
    let mut out = String::new();
    let mut values = values.iter();
    for piece in &pieces {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Hole => out.push_str(&format_value(values.next().unwrap_or(&Value::Null))),
        }
    }
    Ok(Value::String(out))
}

/// How Format writes a value: strings as they are, other scalars as JSON, arrays as
/// `[a, b]` and objects as `{k=v, …}` (as Step Functions does).
fn format_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(list) => {
            format!(
                "[{}]",
                list.iter().map(format_value).collect::<Vec<_>>().join(", ")
            )
        }
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("{k}={}", format_value(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

/// States.StringToJson: parses a JSON text.
fn string_to_json(v: &Value) -> Result<Value, String> {
    let text = string("States.StringToJson", "the argument", v)?;
    serde_json::from_str(text)
        .map_err(|e| format!("States.StringToJson: the string is not valid JSON: {e}"))
}

/// States.ArrayPartition: chunks of `size` elements, the last one possibly shorter.
fn array_partition(list: &Value, size: &Value) -> Result<Value, String> {
    const F: &str = "States.ArrayPartition";
    let list = array(F, list)?;
    let size = integer(F, "the chunk size", size, false)?;
    let size = usize::try_from(size)
        .ok()
        .filter(|&s| s > 0)
        .ok_or_else(|| format!("{F}: the chunk size must be a positive integer, got {size}"))?;
    Ok(Value::Array(
        list.chunks(size)
            .map(|c| Value::Array(c.to_vec()))
            .collect(),
    ))
}

/// States.ArrayRange: `start`, `start + step`, … up to `end` inclusive.
fn array_range(args: &[Value]) -> Result<Value, String> {
    const F: &str = "States.ArrayRange";
    let start = integer(F, "the start", &args[0], true)?;
    let end = integer(F, "the end", &args[1], true)?;
    let step = integer(F, "the step", &args[2], true)?;
    if step == 0 {
        return Err(format!("{F}: the step must not be 0"));
    }
    // In i128: the operands may be any i64.
    let (start, end, step) = (i128::from(start), i128::from(end), i128::from(step));
    let span = if step > 0 { end - start } else { start - end };
    let count = if span < 0 { 0 } else { span / step.abs() + 1 };
    if count > i128::from(MAX_RANGE) {
        return Err(format!(
            "{F}: the range has {count} elements; the most is {MAX_RANGE}"
        ));
    }
    // Every element lies between start and end, so it fits in an i64.
    let element = |i: i128| Value::from(i64::try_from(start + i * step).unwrap_or_default());
    Ok(Value::Array((0..count).map(element).collect()))
}

/// States.ArrayGetItem: the element at an index.
fn array_get_item(list: &Value, index: &Value) -> Result<Value, String> {
    const F: &str = "States.ArrayGetItem";
    let list = array(F, list)?;
    let index = integer(F, "the index", index, false)?;
    usize::try_from(index)
        .ok()
        .and_then(|i| list.get(i))
        .cloned()
        .ok_or_else(|| {
            format!(
                "{F}: index {index} is out of range for an array of {} elements",
                list.len()
            )
        })
}

/// States.ArrayUnique: the elements without repeats, in first-seen order.
fn array_unique(list: &Value) -> Result<Value, String> {
    let mut out: Vec<Value> = Vec::new();
    for v in array("States.ArrayUnique", list)? {
        if !out.contains(v) {
            out.push(v.clone());
        }
    }
    Ok(Value::Array(out))
}

/// A codec input (Base64, Hash): a string of at most [`MAX_CODEC_INPUT`] characters.
fn codec_input<'v>(function: &str, v: &'v Value) -> Result<&'v str, String> {
    let s = string(function, "the input", v)?;
    let n = s.chars().count();
    if n > MAX_CODEC_INPUT {
        return Err(format!(
            "{function}: the input has {n} characters; the most is {MAX_CODEC_INPUT}"
        ));
    }
    Ok(s)
}

/// States.Base64Encode: standard Base64 (with padding) of the string's UTF-8 bytes.
fn base64_encode(v: &Value) -> Result<Value, String> {
    let s = codec_input("States.Base64Encode", v)?;
    Ok(Value::String(
        base64::engine::general_purpose::STANDARD.encode(s),
    ))
}

/// States.Base64Decode: the UTF-8 text of standard Base64.
fn base64_decode(v: &Value) -> Result<Value, String> {
    const F: &str = "States.Base64Decode";
    let s = codec_input(F, v)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| format!("{F}: the input is not valid Base64: {e}"))?;
    String::from_utf8(bytes)
        .map(Value::String)
        .map_err(|_| format!("{F}: the decoded data is not UTF-8 text"))
}

/// Checks a `States.Hash` algorithm name.
fn algorithm(name: &str) -> Result<&str, String> {
    match ALGORITHMS.iter().find(|(n, _)| *n == name) {
        Some((n, true)) => Ok(n),
        Some((n, false)) => Err(format!(
            "States.Hash: the algorithm {n} is not supported here; use SHA-1, SHA-256, SHA-384 \
             or SHA-512"
        )),
        None => Err(format!(
            "States.Hash: unknown algorithm `{name}`; use SHA-1, SHA-256, SHA-384 or SHA-512"
        )),
    }
}

/// States.Hash: the lowercase hex digest of the string's UTF-8 bytes.
fn hash(data: &Value, algo: &Value) -> Result<Value, String> {
    const F: &str = "States.Hash";
    let data = codec_input(F, data)?.as_bytes();
    let digest: Vec<u8> = match algorithm(string(F, "the algorithm", algo)?)? {
        "SHA-1" => sha1::Sha1::digest(data).to_vec(),
        "SHA-256" => sha2::Sha256::digest(data).to_vec(),
        "SHA-384" => sha2::Sha384::digest(data).to_vec(),
        _ => sha2::Sha512::digest(data).to_vec(),
    };
    Ok(Value::String(
        digest.iter().map(|b| format!("{b:02x}")).collect(),
    ))
}

/// Why a deep JsonMerge is refused.
fn deep_merge_error() -> String {
    "States.JsonMerge: only the shallow merge is supported; pass false as the third argument"
        .to_string()
}

/// States.JsonMerge: a shallow merge, the second object's fields winning.
fn json_merge(args: &[Value]) -> Result<Value, String> {
    const F: &str = "States.JsonMerge";
    match &args[2] {
        Value::Bool(false) => {}
        Value::Bool(true) => return Err(deep_merge_error()),
        other => {
            return Err(format!(
                "{F}: the third argument must be false, got {other}"
            ))
        }
    }
    let object = |v: &Value, nth: &str| -> Result<Map<String, Value>, String> {
        v.as_object().cloned().ok_or_else(|| {
            format!(
                "{F}: the {nth} argument must be an object, got {}",
                kind_of(v)
            )
        })
    };
    let mut merged = object(&args[0], "first")?;
    merged.extend(object(&args[1], "second")?);
    Ok(Value::Object(merged))
}

/// States.MathRandom: a random integer from `start` to `end` inclusive; with a seed, the
/// same seed gives the same number.
fn math_random(args: &[Value]) -> Result<Value, String> {
    const F: &str = "States.MathRandom";
    let start = int32(F, "the start", &args[0])?;
    let end = int32(F, "the end", &args[1])?;
    if start > end {
        return Err(format!(
            "{F}: the start ({start}) is greater than the end ({end})"
        ));
    }
    let n = match args.get(2) {
        Some(seed) => {
            let seed = integer(F, "the seed", seed, true)?;
            rand::rngs::StdRng::seed_from_u64(seed as u64).random_range(start..=end)
        }
        None => rand::rng().random_range(start..=end),
    };
    Ok(Value::from(n))
}

/// States.MathAdd: the sum of two integers.
fn math_add(a: &Value, b: &Value) -> Result<Value, String> {
    let a = int32("States.MathAdd", "the first argument", a)?;
    let b = int32("States.MathAdd", "the second argument", b)?;
    Ok(Value::from(a + b))
}

/// States.StringSplit: the string cut at every one of the delimiter characters, empty
/// parts dropped.
fn string_split(s: &Value, delimiters: &Value) -> Result<Value, String> {
    let s = string("States.StringSplit", "the string", s)?;
    let delimiters = string("States.StringSplit", "the delimiters", delimiters)?;
    Ok(Value::Array(
        s.split(|c| delimiters.contains(c))
            .filter(|p| !p.is_empty())
            .map(|p| Value::String(p.to_string()))
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(expr: &str, input: Value) -> Result<Value, StatesError> {
        let context = json!({"Execution": {"Id": "exec-1"}});
        let vars = match json!({"greeting": "Hi", "n": 2}) {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        eval(
            expr,
            &Scope {
                input: &input,
                context: &context,
                vars: &vars,
            },
        )
    }

    fn ok(expr: &str, input: Value) -> Value {
        run(expr, input).unwrap_or_else(|e| panic!("{expr}: {e}"))
    }

    fn fails(expr: &str, input: Value) -> String {
        let e = run(expr, input).expect_err(expr);
        assert_eq!(e.error, names::INTRINSIC_FAILURE, "{expr}");
        e.cause
    }

    #[test]
    fn format_aws_examples() {
        let input = json!({"name": "Arnav", "template": "Hello, my name is {}."});
        assert_eq!(
            ok(
                "States.Format('Hello, my name is {}.', $.name)",
                input.clone()
            ),
            json!("Hello, my name is Arnav.")
        );
        assert_eq!(
            ok("States.Format($.template, $.name)", input),
            json!("Hello, my name is Arnav.")
        );
        assert_eq!(
            ok(
                "States.Format('{} {} {} {}', 1, true, null, 'x')",
                json!({})
            ),
            json!("1 true null x")
        );
        assert_eq!(
            ok(
                "States.Format('v={}', $.v)",
                json!({"v": {"a": 1, "b": [1, "x"]}})
            ),
            json!("v={a=1, b=[1, x]}")
        );
        assert_eq!(
            ok(
                "States.Format('{}-{}', $$.Execution.Id, $greeting)",
                json!({})
            ),
            json!("exec-1-Hi")
        );
    }

    #[test]
    fn string_escapes() {
        assert_eq!(
            ok(r"States.Format('It\'s {}', 'me')", json!({})),
            json!("It's me")
        );
        assert_eq!(
            ok(r"States.Format('\{\} {} \\', 'x')", json!({})),
            json!("{} x \\")
        );
        assert_eq!(
            ok(r"States.Array('a\'b', '\{', 'c\\d')", json!({})),
            json!(["a'b", "{", "c\\d"])
        );
        assert_eq!(
            ok("States.Array('a,b)', ' x ')", json!({})),
            json!(["a,b)", " x "])
        );
        assert!(check(r"States.Array('\n')")
            .unwrap_err()
            .contains("unknown escape"));
        assert!(check("States.Array('abc)")
            .unwrap_err()
            .contains("unterminated"));
        assert!(fails("States.Format('a { b')", json!({})).contains("lone `{`"));
    }

    #[test]
    fn format_counts_holes() {
        assert!(check("States.Format('{} and {}', 1)")
            .unwrap_err()
            .contains("2 `{}` but 1"));
        assert!(check("States.Format('none', 1)").is_err());
        assert!(fails("States.Format($.t, 1)", json!({"t": "{} {}"})).contains("2 `{}`"));
        assert!(fails("States.Format($.t)", json!({"t": 5})).contains("must be a string"));
        assert_eq!(check("States.Format($.t, 1, 2)"), Ok(()));
    }

    #[test]
    fn json_string_conversions() {
        assert_eq!(
            ok(
                "States.StringToJson($.escapedJsonString)",
                json!({"escapedJsonString": "{\"foo\": \"bar\"}"})
            ),
            json!({"foo": "bar"})
        );
        assert_eq!(
            ok(
                "States.JsonToString($.unescapedJson)",
                json!({"unescapedJson": {"foo": "bar"}})
            ),
            json!("{\"foo\":\"bar\"}")
        );
        assert!(fails("States.StringToJson('{bad')", json!({})).contains("not valid JSON"));
        assert!(fails("States.StringToJson(3)", json!({})).contains("must be a string"));
    }

    #[test]
    fn arrays() {
        let input = json!({"Id": 123456, "inputArray": [1, 2, 3, 4, 5, 6, 7, 8, 9], "lookingFor": 5, "index": 5});
        assert_eq!(ok("States.Array($.Id)", input.clone()), json!([123456]));
        assert_eq!(ok("States.Array()", input.clone()), json!([]));
        assert_eq!(
            ok("States.Array('a', 1, true, null, $.Id)", input.clone()),
            json!(["a", 1, true, null, 123456])
        );
        assert_eq!(
            ok(
                "States.ArrayPartition(States.Array(1,2,3,4,5,6,7,8,9), 4)",
                json!({})
            ),
            json!([[1, 2, 3, 4], [5, 6, 7, 8], [9]])
        );
        assert_eq!(
            ok("States.ArrayPartition($.inputArray, 4)", input.clone()),
            json!([[1, 2, 3, 4], [5, 6, 7, 8], [9]])
        );
        assert_eq!(
            ok(
                "States.ArrayContains($.inputArray, $.lookingFor)",
                input.clone()
            ),
            json!(true)
        );
        assert_eq!(
            ok("States.ArrayContains($.inputArray, 10)", input.clone()),
            json!(false)
        );
        assert_eq!(
            ok("States.ArrayGetItem($.inputArray, $.index)", input.clone()),
            json!(6)
        );
        assert_eq!(
            ok("States.ArrayLength($.inputArray)", input.clone()),
            json!(9)
        );
        assert_eq!(
            ok(
                "States.ArrayUnique($.a)",
                json!({"a": [1, 2, 3, 3, 3, 3, 3, 3, 4]})
            ),
            json!([1, 2, 3, 4])
        );
        assert!(
            fails("States.ArrayGetItem($.inputArray, 9)", input.clone()).contains("out of range")
        );
        assert!(
            fails("States.ArrayGetItem($.inputArray, -1)", input.clone()).contains("out of range")
        );
        assert!(
            fails("States.ArrayPartition($.inputArray, 0)", input.clone()).contains("positive")
        );
        assert!(fails("States.ArrayLength($.Id)", input).contains("expected an array"));
    }

    #[test]
    fn array_range() {
        assert_eq!(
            ok("States.ArrayRange(1, 9, 2)", json!({})),
            json!([1, 3, 5, 7, 9])
        );
        assert_eq!(
            ok("States.ArrayRange(1, 10, 2)", json!({})),
            json!([1, 3, 5, 7, 9])
        );
        assert_eq!(
            ok("States.ArrayRange(5, 1, -2)", json!({})),
            json!([5, 3, 1])
        );
        assert_eq!(ok("States.ArrayRange(5, 1, 1)", json!({})), json!([]));
        assert_eq!(
            ok("States.ArrayRange(0, 999, 1)", json!({}))
                .as_array()
                .unwrap()
                .len(),
            1000
        );
        assert!(fails("States.ArrayRange(0, 1000, 1)", json!({})).contains("1001 elements"));
        assert!(fails("States.ArrayRange(1, 9, 0)", json!({})).contains("must not be 0"));
        let huge = "States.ArrayRange(-9223372036854775808, 9223372036854775807, 1)";
        assert!(fails(huge, json!({})).contains("the most is 1000"));
        assert_eq!(
            ok(
                "States.ArrayRange(9223372036854775806, 9223372036854775807, 5)",
                json!({})
            ),
            json!([9223372036854775806i64])
        );
        assert!(fails("States.ArrayRange(1, 'x', 1)", json!({})).contains("integer"));
    }

    #[test]
    fn base64() {
        assert_eq!(
            ok(
                "States.Base64Encode($.input)",
                json!({"input": "Data to encode"})
            ),
            json!("RGF0YSB0byBlbmNvZGU=")
        );
        assert_eq!(
            ok(
                "States.Base64Decode($.base64)",
                json!({"base64": "RGF0YSB0byBlbmNvZGU="})
            ),
            json!("Data to encode")
        );
        assert_eq!(
            ok(
                "States.Base64Decode(States.Base64Encode('héllo'))",
                json!({})
            ),
            json!("héllo")
        );
        assert!(fails("States.Base64Decode('not base64!')", json!({})).contains("not valid Base64"));
        let long = "a".repeat(10_001);
        assert!(fails("States.Base64Decode($.s)", json!({"s": long})).contains("10001 characters"));
        assert!(
            fails("States.Base64Encode($.s)", json!({"s": "a".repeat(10_001)}))
                .contains("the most is 10000")
        );
        assert_eq!(
            ok("States.Base64Encode($.s)", json!({"s": "a".repeat(10_000)}))
                .as_str()
                .map(str::len),
            Some(13_336)
        );
    }

    #[test]
    fn hashes() {
        let input = json!({"Data": "input data", "Algorithm": "SHA-1"});
        assert_eq!(
            ok("States.Hash($.Data, $.Algorithm)", input),
            json!("aaff4a450a104cd177d28d18d74485e8cae074b7")
        );
        assert_eq!(
            ok("States.Hash('input data', 'SHA-1')", json!({})),
            json!("aaff4a450a104cd177d28d18d74485e8cae074b7")
        );
        assert_eq!(
            ok("States.Hash('abc', 'SHA-256')", json!({})),
            json!("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        assert_eq!(
            ok("States.Hash('abc', 'SHA-384')", json!({})),
            json!("cb00753f45a35e8bb5a03d699ac65007272c32ab0eded1631a8b605a43ff5bed8086072ba1e7cc2358baeca134c825a7")
        );
        assert_eq!(
            ok("States.Hash('abc', 'SHA-512')", json!({})),
            json!("ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f")
        );
        assert!(check("States.Hash('x', 'MD5')")
            .unwrap_err()
            .contains("not supported"));
        assert!(fails("States.Hash('x', $.a)", json!({"a": "MD5"})).contains("not supported"));
        assert!(fails("States.Hash('x', 'SHA-3')", json!({})).contains("unknown algorithm"));
        assert!(fails("States.Hash(1, 'SHA-1')", json!({})).contains("must be a string"));
    }

    #[test]
    fn json_merge() {
        let input = json!({"json1": {"a": {"a1": 1, "a2": 2}, "b": 2}, "json2": {"a": {"a3": 1, "a4": 2}, "c": 3}});
        assert_eq!(
            ok("States.JsonMerge($.json1, $.json2, false)", input.clone()),
            json!({"a": {"a3": 1, "a4": 2}, "b": 2, "c": 3})
        );
        assert!(check("States.JsonMerge($.json1, $.json2, true)")
            .unwrap_err()
            .contains("shallow"));
        assert!(
            fails("States.JsonMerge($.json1, 1, false)", input.clone()).contains("second argument")
        );
        assert!(
            fails("States.JsonMerge($.json1, $.json2, $.json1.b)", input).contains("must be false")
        );
    }

    #[test]
    fn math() {
        assert_eq!(
            ok(
                "States.MathAdd($.value1, $.step)",
                json!({"value1": 111, "step": -1})
            ),
            json!(110)
        );
        assert_eq!(ok("States.MathAdd(1.5, 2)", json!({})), json!(4));
        assert!(fails("States.MathAdd(2147483648, 1)", json!({})).contains("between"));
        assert!(fails("States.MathAdd('1', 1)", json!({})).contains("integer"));
        for _ in 0..50 {
            let n = ok(
                "States.MathRandom($.start, $.end)",
                json!({"start": 1, "end": 5}),
            )
            .as_i64()
            .unwrap();
            assert!((1..=5).contains(&n), "{n}");
        }
        let a = ok("States.MathRandom(1, 999, 7)", json!({}));
        assert_eq!(a, ok("States.MathRandom(1, 999, 7)", json!({})));
        assert_eq!(ok("States.MathRandom(3, 3)", json!({})), json!(3));
        assert!(fails("States.MathRandom(5, 1)", json!({})).contains("greater"));
    }

    #[test]
    fn string_split_and_uuid() {
        assert_eq!(
            ok(
                "States.StringSplit($.inputString, $.splitter)",
                json!({"inputString": "1,2,3,4,5", "splitter": ","})
            ),
            json!(["1", "2", "3", "4", "5"])
        );
        assert_eq!(
            ok(
                "States.StringSplit($.inputString, $.splitter)",
                json!({"inputString": "This.is+a,test=string", "splitter": ".+,="})
            ),
            json!(["This", "is", "a", "test", "string"])
        );
        assert_eq!(
            ok("States.StringSplit('a,,b,', ',')", json!({})),
            json!(["a", "b"])
        );
        let id = ok("States.UUID()", json!({}));
        let parsed = uuid::Uuid::parse_str(id.as_str().unwrap()).unwrap();
        assert_eq!(parsed.get_version_num(), 4);
        assert_ne!(id, ok("States.UUID()", json!({})));
    }

    #[test]
    fn nested_calls_and_paths() {
        let input = json!({"ImageRecipe": {"Arn": "arn:aws:imagebuilder:us-east-1:123456789012:image-recipe/my.recipe.name/1.0.0"}});
        let expr = "States.Format('{}.{}.{}', States.ArrayGetItem(States.StringSplit(States.ArrayGetItem(States.StringSplit($.ImageRecipe.Arn, '/'), 2), '.'), 0), States.ArrayGetItem(States.StringSplit(States.ArrayGetItem(States.StringSplit($.ImageRecipe.Arn, '/'), 2), '.'), 1), States.ArrayLength(States.Array(1, 2)))";
        assert_eq!(ok(expr, input), json!("1.0.2"));
        assert_eq!(
            ok(
                "States.ArrayLength($.a[?@.x == 'a,b)'])",
                json!({"a": [{"x": "a,b)"}, {"x": 1}]})
            ),
            json!(1)
        );
        assert_eq!(
            ok("States.Array($n, $$.Execution.Id)", json!({})),
            json!([2, "exec-1"])
        );
        assert!(fails("States.Array($.missing)", json!({})).contains("$.missing"));
        let deep = format!("{}1{}", "States.Array(".repeat(11), ")".repeat(11));
        assert!(check(&deep).unwrap_err().contains("nest at most 10"));
        let ten = format!("{}1{}", "States.Array(".repeat(10), ")".repeat(10));
        assert_eq!(check(&ten), Ok(()));
    }

    #[test]
    fn check_rejects_bad_calls() {
        assert_eq!(check("  States.Format('{}', $.a)  "), Ok(()));
        assert!(check("States.Nope(1)")
            .unwrap_err()
            .contains("unknown intrinsic function `States.Nope`"));
        assert!(check("Format('x')")
            .unwrap_err()
            .contains("unknown intrinsic"));
        assert!(check("States.ArrayLength(1, 2)")
            .unwrap_err()
            .contains("takes 1 argument(s), not 2"));
        assert!(check("States.MathRandom(1)")
            .unwrap_err()
            .contains("2 to 3"));
        assert!(check("States.UUID(1)").is_err());
        assert!(check("States.Format()").unwrap_err().contains("at least 1"));
        assert!(check("States.Array(1, 2")
            .unwrap_err()
            .contains("missing `)`"));
        assert!(check("States.Array(1 2)")
            .unwrap_err()
            .contains("expected `,` or `)`"));
        assert!(check("States.Array(1,)").is_err());
        assert!(check("States.Array(1) x")
            .unwrap_err()
            .contains("after the end"));
        assert!(check("States.Array(01x)")
            .unwrap_err()
            .contains("not a number"));
        assert!(check("States.Array($.a[)").is_err());
        assert!(check("States.Array(@)")
            .unwrap_err()
            .contains("expected an argument"));
        assert!(check("States.Array").unwrap_err().contains("expected `(`"));
        assert!(check("States.Array(States.Bad())")
            .unwrap_err()
            .contains("States.Bad"));
        assert!(check("States.Array(States.ArrayLength())").is_err());
        assert!(fails("States.Array(", json!({})).contains("missing `)`"));
    }
}
