//! Deterministic JSON that conforms to a JSON Schema, for structured
//! outputs (`response_format: json_schema`) and tool-call arguments.
//!
//! It covers what structured outputs use: objects with `properties`
//! (every property is written, as strict mode requires them all), arrays
//! with `minItems`/`maxItems`, `enum` and `const`, strings with
//! `minLength`/`maxLength`, numbers and integers with their bounds,
//! booleans, null, `anyOf`/`oneOf` (one branch), type lists, and `$ref`
//! into `$defs`/`definitions`. Lengths come from the caller's generator,
//! so the same request gives the same document; a test that wants an
//! array of a given size says so in the schema it sends.

use serde_json::{Map, Value};

/// Deepest nesting followed (`$ref` cycles, absurd schemas).
const MAX_DEPTH: usize = 24;
/// Most elements of one array, whatever `minItems` says: a simulated
/// answer has to stay small enough to send.
const MAX_ITEMS: u64 = 10_000;
/// Elements of an array without bounds: a few, so outputs stay short.
const DEFAULT_MAX_ITEMS: u64 = 3;

/// The random source: a function of the request only (see `super::text`).
pub(super) trait Draw {
    fn next(&mut self) -> u64;
    /// A sentence of pseudo-text.
    fn sentence(&mut self) -> String;
}

/// A value of `schema`, whose `$ref`s resolve against `root`.
pub(super) fn generate(schema: &Value, root: &Value, rng: &mut dyn Draw) -> Value {
    value(schema, root, rng, 0)
}

fn value(schema: &Value, root: &Value, rng: &mut dyn Draw, depth: usize) -> Value {
    let Value::Object(s) = schema else { return Value::Null };
    if depth > MAX_DEPTH {
        return Value::Null;
    }
    if let Some(c) = s.get("const") {
        return c.clone();
    }
    if let Some(Value::Array(options)) = s.get("enum")
        && !options.is_empty()
    {
        return options[(rng.next() % options.len() as u64) as usize].clone();
    }
    if let Some(target) = s.get("$ref").and_then(Value::as_str).and_then(|r| resolve_ref(root, r)) {
        return value(target, root, rng, depth + 1);
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(Value::Array(options)) = s.get(key)
            && !options.is_empty()
        {
            let pick = &options[(rng.next() % options.len() as u64) as usize];
            return value(pick, root, rng, depth + 1);
        }
    }
    let kind = match s.get("type") {
        Some(Value::String(t)) => t.as_str(),
        // A list of types: one of them, preferring a non-null one.
        Some(Value::Array(types)) => {
            let named: Vec<&str> = types.iter().filter_map(Value::as_str).filter(|t| *t != "null").collect();
            if named.is_empty() { "null" } else { named[(rng.next() % named.len() as u64) as usize] }
        }
        _ if s.contains_key("properties") => "object",
        _ if s.contains_key("items") => "array",
        _ => "string",
    };
    match kind {
        "object" => {
            let mut out = Map::new();
            if let Some(Value::Object(props)) = s.get("properties") {
                for (name, sub) in props {
                    out.insert(name.clone(), value(sub, root, rng, depth + 1));
                }
            }
            Value::Object(out)
        }
        "array" => {
            let min = s.get("minItems").and_then(Value::as_u64).unwrap_or(0).min(MAX_ITEMS);
            let max = s
                .get("maxItems")
                .and_then(Value::as_u64)
                .unwrap_or(min.max(1) + DEFAULT_MAX_ITEMS - 1)
                .clamp(min, MAX_ITEMS);
            let n = min + rng.next() % (max - min + 1);
            let items = s.get("items").cloned().unwrap_or(Value::Null);
            Value::Array((0..n).map(|_| value(&items, root, rng, depth + 1)).collect())
        }
        "string" => Value::String(string(s, rng)),
        "integer" => {
            let (lo, hi) = bounds(s, 0.0, 100.0);
            let (lo, hi) = (lo.ceil() as i64, hi.floor() as i64);
            if hi < lo {
                return Value::from(lo);
            }
            let span = (hi - lo) as u64 + 1;
            Value::from(lo + (rng.next() % span) as i64)
        }
        "number" => {
            let (lo, hi) = bounds(s, 0.0, 100.0);
            // Whole hundredths within the bounds.
            let steps = (((hi - lo) * 100.0).floor().max(0.0) as u64).min(1 << 40);
            let x = lo + (rng.next() % (steps + 1)) as f64 / 100.0;
            serde_json::Number::from_f64(x.clamp(lo, hi)).map_or(Value::Null, Value::Number)
        }
        "boolean" => Value::Bool(rng.next().is_multiple_of(2)),
        _ => Value::Null,
    }
}

/// `#/$defs/Name` or `#/definitions/Name` in `root`.
fn resolve_ref<'a>(root: &'a Value, r: &str) -> Option<&'a Value> {
    if r == "#" {
        return Some(root);
    }
    let path = r.strip_prefix("#/")?;
    path.split('/').try_fold(root, |v, part| v.get(part.replace("~1", "/").replace("~0", "~")))
}

/// The inclusive bounds a number must keep, from `minimum`/`maximum` and
/// their exclusive forms, else the defaults.
fn bounds(s: &Map<String, Value>, lo: f64, hi: f64) -> (f64, f64) {
    let get = |k: &str| s.get(k).and_then(Value::as_f64);
    let lo = get("minimum").or(get("exclusiveMinimum").map(|x| x + 1.0)).unwrap_or(lo);
    let hi = get("maximum").or(get("exclusiveMaximum").map(|x| x - 1.0)).unwrap_or(hi.max(lo + 100.0));
    (lo, hi.max(lo))
}

/// A sentence, cut or padded to `minLength`/`maxLength` (in characters).
fn string(s: &Map<String, Value>, rng: &mut dyn Draw) -> String {
    let min = s.get("minLength").and_then(Value::as_u64).unwrap_or(0).min(MAX_ITEMS) as usize;
    let max = s.get("maxLength").and_then(Value::as_u64).map_or(usize::MAX, |m| m as usize).max(min);
    let mut text = rng.sentence();
    while text.chars().count() < min {
        text.push(' ');
        text.push_str(&rng.sentence());
    }
    if text.chars().count() > max {
        text = text.chars().take(max).collect();
    }
    text
}

#[cfg(test)]
pub(super) mod tests {
    use serde_json::json;

    use super::*;

    /// A tiny checker of what [`generate`] promises, independent of it.
    pub(in crate::sim) fn conforms(v: &Value, s: &Value, root: &Value) -> Result<(), String> {
        let Value::Object(m) = s else { return Ok(()) };
        if let Some(r) = m.get("$ref").and_then(Value::as_str) {
            return conforms(v, resolve_ref(root, r).ok_or("dangling $ref")?, root);
        }
        if let Some(Value::Array(options)) = m.get("anyOf").or(m.get("oneOf")) {
            return if options.iter().any(|o| conforms(v, o, root).is_ok()) {
                Ok(())
            } else {
                Err(format!("{v} in no branch"))
            };
        }
        if let Some(c) = m.get("const") {
            return if v == c { Ok(()) } else { Err(format!("{v} != const {c}")) };
        }
        if let Some(Value::Array(e)) = m.get("enum") {
            return if e.contains(v) { Ok(()) } else { Err(format!("{v} not in enum")) };
        }
        let types: Vec<&str> = match m.get("type") {
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(t)) => t.iter().filter_map(Value::as_str).collect(),
            _ => return Ok(()),
        };
        let ok_type = types.iter().any(|t| match (*t, v) {
            ("object", Value::Object(_)) | ("array", Value::Array(_)) | ("string", Value::String(_)) => true,
            ("boolean", Value::Bool(_)) | ("null", Value::Null) | ("number", Value::Number(_)) => true,
            ("integer", Value::Number(n)) => n.is_i64() || n.is_u64(),
            _ => false,
        });
        if !ok_type {
            return Err(format!("{v} is not of type {types:?}"));
        }
        let num = |k: &str| m.get(k).and_then(Value::as_f64);
        match v {
            Value::Object(o) => {
                for r in m.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
                    if !o.contains_key(r) {
                        return Err(format!("missing required {r}"));
                    }
                }
                let props = m.get("properties").and_then(Value::as_object);
                for (k, x) in o {
                    match props.and_then(|p| p.get(k)) {
                        Some(sub) => conforms(x, sub, root).map_err(|e| format!(".{k}: {e}"))?,
                        None if m.get("additionalProperties") == Some(&json!(false)) => {
                            return Err(format!("extra property {k}"));
                        }
                        None => {}
                    }
                }
            }
            Value::Array(a) => {
                let n = a.len() as f64;
                if num("minItems").is_some_and(|x| n < x) || num("maxItems").is_some_and(|x| n > x) {
                    return Err(format!("{} items out of bounds", a.len()));
                }
                if let Some(items) = m.get("items") {
                    for (i, x) in a.iter().enumerate() {
                        conforms(x, items, root).map_err(|e| format!("[{i}]: {e}"))?;
                    }
                }
            }
            Value::String(t) => {
                let n = t.chars().count() as f64;
                if num("minLength").is_some_and(|x| n < x) || num("maxLength").is_some_and(|x| n > x) {
                    return Err(format!("string of {n} chars out of bounds"));
                }
            }
            Value::Number(x) => {
                let x = x.as_f64().unwrap_or(f64::NAN);
                if num("minimum").is_some_and(|b| x < b) || num("maximum").is_some_and(|b| x > b) {
                    return Err(format!("{x} out of bounds"));
                }
                if num("exclusiveMinimum").is_some_and(|b| x <= b) || num("exclusiveMaximum").is_some_and(|b| x >= b) {
                    return Err(format!("{x} out of exclusive bounds"));
                }
            }
            _ => {}
        }
        Ok(())
    }

    struct Counter(u64);
    impl Draw for Counter {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            self.0 >> 11
        }
        fn sentence(&mut self) -> String {
            format!("Sentence {}.", self.next() % 1000)
        }
    }

    #[test]
    fn generated_documents_conform_to_their_schema() {
        let schema = json!({
            "type": "object", "additionalProperties": false, "required": ["title", "scenes", "mood", "rating", "tags", "ref"],
            "$defs": {"Beat": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 3}}}},
            "properties": {
                "title": {"type": "string", "minLength": 3, "maxLength": 40},
                "scenes": {"type": "array", "minItems": 24, "maxItems": 40, "items": {"type": "object",
                    "properties": {"heading": {"type": "string"}, "beats": {"type": "array", "items": {"$ref": "#/$defs/Beat"}}}}},
                "mood": {"enum": ["dark", "light"]},
                "rating": {"type": "number", "exclusiveMinimum": 0, "maximum": 5},
                "tags": {"type": ["array", "null"], "items": {"type": "boolean"}, "maxItems": 2},
                "ref": {"anyOf": [{"type": "null"}, {"const": 7}]}
            }
        });
        for seed in 0..200 {
            let v = generate(&schema, &schema, &mut Counter(seed));
            conforms(&v, &schema, &schema).unwrap_or_else(|e| panic!("seed {seed}: {e}\n{v}"));
            let n = v["scenes"].as_array().unwrap().len();
            assert!((24..=40).contains(&n));
        }
        // The same draws, the same document.
        assert_eq!(generate(&schema, &schema, &mut Counter(5)), generate(&schema, &schema, &mut Counter(5)));
        let too_many = json!({"type": "array", "minItems": 300, "items": {"type": "integer"}});
        assert_eq!(generate(&too_many, &too_many, &mut Counter(1)).as_array().unwrap().len(), 300);
        let cyclic = json!({"$ref": "#"});
        assert_eq!(generate(&cyclic, &cyclic, &mut Counter(1)), Value::Null, "a $ref cycle ends");
    }
}
