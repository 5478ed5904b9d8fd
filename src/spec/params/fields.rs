//! One request field's JSON value to its typed value, or a [`SpecError`]
//! naming the field (`f`, its whole path) and what was wrong.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::{
    FIELDS, JsonSchemaFormat, MAX_ID_STRING, MAX_METADATA, MAX_METADATA_KEY, MAX_METADATA_VALUE, MAX_STOP, MAX_TOOLS,
    RESERVED, ResponseFormat, Tool, ToolChoice,
};
use crate::spec::SpecError;

pub(super) fn tokens(v: &Value, f: &str, cap: u32) -> Result<u32, SpecError> {
    integer(v, f, 1, u64::from(cap)).map(|t| t as u32)
}

pub(super) fn integer(v: &Value, f: &str, min: u64, max: u64) -> Result<u64, SpecError> {
    let range = || SpecError::new(f, format!("must be an integer between {min} and {max}, got {v}"));
    let n = v.as_u64().ok_or_else(range)?;
    if !(min..=max).contains(&n) {
        return Err(range());
    }
    Ok(n)
}

pub(super) fn number(v: &Value, f: &str, min: f64, max: f64) -> Result<f64, SpecError> {
    let x = v.as_f64().ok_or_else(|| SpecError::new(f, format!("must be a number between {min} and {max}")))?;
    if !(min..=max).contains(&x) {
        return Err(SpecError::new(f, format!("must be between {min} and {max}, got {v}")));
    }
    Ok(x)
}

pub(super) fn boolean(v: &Value, f: &str) -> Result<bool, SpecError> {
    v.as_bool().ok_or_else(|| SpecError::new(f, "must be true or false"))
}

pub(super) fn object<'v>(v: &'v Value, f: &str) -> Result<&'v Map<String, Value>, SpecError> {
    v.as_object().ok_or_else(|| SpecError::new(f, "must be a JSON object"))
}

pub(super) fn string<'v>(v: &'v Value, f: &str) -> Result<&'v str, SpecError> {
    v.as_str().ok_or_else(|| SpecError::new(f, "must be a string"))
}

pub(super) fn short_string(v: &Value, f: &str) -> Result<String, SpecError> {
    let s = string(v, f)?;
    let n = s.chars().count();
    if n == 0 || n > MAX_ID_STRING {
        return Err(SpecError::new(f, format!("must be 1 to {MAX_ID_STRING} characters, got {n}")));
    }
    Ok(s.to_owned())
}

/// Keys of an object that only `allowed` may be.
pub(super) fn only_keys(m: &Map<String, Value>, f: &str, allowed: &[&str]) -> Result<(), SpecError> {
    match m.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => {
            Err(SpecError::new(format!("{f}.{k}"), format!("unknown field (expected one of {})", allowed.join(", "))))
        }
        None => Ok(()),
    }
}

/// OpenAI's rule for function and schema names.
pub(in crate::spec) fn check_function_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 64 || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(format!("must be 1 to 64 letters, digits, '_' or '-', got {s:?}"));
    }
    Ok(())
}

pub(super) fn name(v: &Value, f: &str) -> Result<String, SpecError> {
    let s = string(v, f)?;
    check_function_name(s).map_err(|m| SpecError::new(f, m))?;
    Ok(s.to_owned())
}

pub(super) fn logit_bias(v: &Value, f: &str) -> Result<BTreeMap<u32, serde_json::Number>, SpecError> {
    let mut out = BTreeMap::new();
    for (k, bias) in object(v, f)? {
        let fk = format!("{f}.{k}");
        let token = k
            .parse::<u32>()
            .ok()
            .filter(|t| &t.to_string() == k)
            .ok_or_else(|| SpecError::new(&fk, "a key is a token id: a decimal number"))?;
        number(bias, &fk, -100.0, 100.0)?;
        let Value::Number(n) = bias else { return Err(SpecError::new(fk, "must be a number")) };
        out.insert(token, n.clone());
    }
    Ok(out)
}

pub(super) fn stop(v: &Value, f: &str) -> Result<Vec<String>, SpecError> {
    let list: Vec<String> = match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.as_str().map(str::to_owned).ok_or_else(|| SpecError::new(format!("{f}[{i}]"), "must be a string"))
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(SpecError::new(f, "must be a string or an array of strings")),
    };
    if list.is_empty() || list.len() > MAX_STOP {
        return Err(SpecError::new(f, format!("must hold 1 to {MAX_STOP} sequences, got {}", list.len())));
    }
    if list.iter().any(String::is_empty) {
        return Err(SpecError::new(f, "a stop sequence must not be empty"));
    }
    Ok(list)
}

pub(super) fn response_format(v: &Value, f: &str) -> Result<ResponseFormat, SpecError> {
    let m = object(v, f)?;
    let kind = string(
        m.get("type").ok_or_else(|| SpecError::new(format!("{f}.type"), "required field is missing"))?,
        &format!("{f}.type"),
    )?;
    match kind {
        "text" | "json_object" => {
            only_keys(m, f, &["type"])?;
            Ok(if kind == "text" { ResponseFormat::Text } else { ResponseFormat::JsonObject })
        }
        "json_schema" => {
            only_keys(m, f, &["type", "json_schema"])?;
            let fj = format!("{f}.json_schema");
            let js =
                object(m.get("json_schema").ok_or_else(|| SpecError::new(&fj, "required field is missing"))?, &fj)?;
            only_keys(js, &fj, &["name", "description", "schema", "strict"])?;
            let field = |k: &str| format!("{fj}.{k}");
            let name = name(
                js.get("name").ok_or_else(|| SpecError::new(field("name"), "required field is missing"))?,
                &field("name"),
            )?;
            let description =
                js.get("description").map(|d| string(d, &field("description")).map(str::to_owned)).transpose()?;
            let schema = js.get("schema").ok_or_else(|| {
                SpecError::new(field("schema"), "required field is missing: the JSON Schema the output follows")
            })?;
            let schema = object(schema, &field("schema"))?.clone();
            let strict = js.get("strict").map(|s| boolean(s, &field("strict"))).transpose()?;
            Ok(ResponseFormat::JsonSchema(JsonSchemaFormat { name, description, schema, strict }))
        }
        other => Err(SpecError::new(
            format!("{f}.type"),
            format!("must be one of text, json_object, json_schema, got {other:?}"),
        )),
    }
}

pub(super) fn tools(v: &Value, f: &str) -> Result<Vec<Tool>, SpecError> {
    let items = v.as_array().ok_or_else(|| SpecError::new(f, "must be an array of tools"))?;
    if items.is_empty() || items.len() > MAX_TOOLS {
        return Err(SpecError::new(f, format!("must hold 1 to {MAX_TOOLS} tools, got {}", items.len())));
    }
    let mut out: Vec<Tool> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let ft = format!("{f}[{i}]");
        let m = object(item, &ft)?;
        only_keys(m, &ft, &["type", "function"])?;
        if m.get("type").and_then(Value::as_str) != Some("function") {
            return Err(SpecError::new(format!("{ft}.type"), "must be \"function\""));
        }
        let ff = format!("{ft}.function");
        let func = object(m.get("function").ok_or_else(|| SpecError::new(&ff, "required field is missing"))?, &ff)?;
        only_keys(func, &ff, &["name", "description", "parameters", "strict"])?;
        let fname = format!("{ff}.name");
        let tool = Tool {
            name: name(func.get("name").ok_or_else(|| SpecError::new(&fname, "required field is missing"))?, &fname)?,
            description: func
                .get("description")
                .map(|d| string(d, &format!("{ff}.description")).map(str::to_owned))
                .transpose()?,
            parameters: func.get("parameters").map(|p| object(p, &format!("{ff}.parameters")).cloned()).transpose()?,
            strict: func.get("strict").map(|s| boolean(s, &format!("{ff}.strict"))).transpose()?,
        };
        if let Some(first) = out.iter().position(|t| t.name == tool.name) {
            return Err(SpecError::new(
                fname,
                format!("duplicate tool name \"{}\" (first used by {f}[{first}])", tool.name),
            ));
        }
        out.push(tool);
    }
    Ok(out)
}

pub(super) fn tool_choice(v: &Value, f: &str) -> Result<ToolChoice, SpecError> {
    match v {
        Value::String(s) => match s.as_str() {
            "none" => Ok(ToolChoice::None),
            "auto" => Ok(ToolChoice::Auto),
            "required" => Ok(ToolChoice::Required),
            other => Err(SpecError::new(f, format!("must be none, auto, required or a function, got {other:?}"))),
        },
        Value::Object(m) => {
            only_keys(m, f, &["type", "function"])?;
            if m.get("type").and_then(Value::as_str) != Some("function") {
                return Err(SpecError::new(format!("{f}.type"), "must be \"function\""));
            }
            let ff = format!("{f}.function");
            let func = object(m.get("function").ok_or_else(|| SpecError::new(&ff, "required field is missing"))?, &ff)?;
            only_keys(func, &ff, &["name"])?;
            let fname = format!("{ff}.name");
            Ok(ToolChoice::Function(name(
                func.get("name").ok_or_else(|| SpecError::new(&fname, "required field is missing"))?,
                &fname,
            )?))
        }
        _ => Err(SpecError::new(
            f,
            "must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": …}}",
        )),
    }
}

pub(super) fn metadata(v: &Value, f: &str) -> Result<BTreeMap<String, String>, SpecError> {
    let m = object(v, f)?;
    if m.len() > MAX_METADATA {
        return Err(SpecError::new(f, format!("has {} pairs, more than the limit of {MAX_METADATA}", m.len())));
    }
    let mut out = BTreeMap::new();
    for (k, value) in m {
        let fk = format!("{f}.{k}");
        if k.is_empty() || k.chars().count() > MAX_METADATA_KEY {
            return Err(SpecError::new(fk, format!("a key is 1 to {MAX_METADATA_KEY} characters")));
        }
        let s = string(value, &fk)?;
        if s.chars().count() > MAX_METADATA_VALUE {
            return Err(SpecError::new(fk, format!("a value is at most {MAX_METADATA_VALUE} characters")));
        }
        out.insert(k.clone(), s.to_owned());
    }
    Ok(out)
}

pub(super) fn extra(v: &Value, f: &str) -> Result<Map<String, Value>, SpecError> {
    let m = object(v, f)?;
    if let Some(k) = m.keys().find(|k| FIELDS.contains(&k.as_str()) || RESERVED.contains(&k.as_str())) {
        let why = if RESERVED.contains(&k.as_str()) {
            "ratepool sets this field itself".to_owned()
        } else {
            format!("is a known field: set it as `{k}` on the step or in defaults")
        };
        return Err(SpecError::new(format!("{f}.{k}"), why));
    }
    Ok(m.clone())
}
