//! Tool calling and structured outputs, the same for every engine: the constraints a request
//! puts on the text (turned into a grammar by the adapter), the check that a JSON schema uses
//! only what the grammar generator understands, and the filter that takes tool calls out of
//! the generated text (streamed content goes on; a call is parsed once it is whole).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::stop::held_prefix;

/// A function call the model made (or made earlier, in a chat's history).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The caller's id for it (`call_…`); empty until the endpoint names it.
    #[serde(default)]
    pub id: String,
    pub name: String,
    /// The arguments, a JSON object as text (OpenAI's shape).
    pub arguments: String,
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: Option<String>,
    /// JSON schema of the arguments (an object schema).
    pub parameters: Value,
}

impl ToolSpec {
    /// The tool as chat templates expect it (OpenAI's `{"type": "function", "function": …}`).
    pub fn template_value(&self) -> Value {
        let mut f = Map::new();
        f.insert("name".into(), self.name.clone().into());
        if let Some(d) = &self.description {
            f.insert("description".into(), d.clone().into());
        }
        f.insert("parameters".into(), self.parameters.clone());
        json!({"type": "function", "function": f})
    }
}

/// How much the request wants a tool called (`tool_choice`; `none` never reaches the engine:
/// the tools are left out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model decides; a call it starts is held to the function's schema.
    Auto,
    /// The answer is one call of one of the tools.
    Required,
    /// The answer is one call of this function.
    Named(String),
}

/// How a model writes a tool call, read from its chat template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>{"name": …, "arguments": …}</tool_call>` (Hermes, Qwen and their kin).
    Tagged,
    /// The whole answer is one JSON object `{"name": …, "arguments"|"parameters": …}` (Llama 3).
    Json,
}

/// Opening and closing tags of [`ToolFormat::Tagged`].
pub const CALL_OPEN: &str = "<tool_call>";
pub const CALL_CLOSE: &str = "</tool_call>";

/// A constraint on the generated text; the adapter turns it into a grammar.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// Any JSON object (`response_format: json_object`).
    JsonObject,
    /// JSON valid for this schema (`response_format: json_schema`).
    JsonSchema(Value),
    /// A call of one of these tools in the model's format. `lazy`: only once the model opens a
    /// call (tool_choice `auto`); otherwise the whole answer is the call.
    ToolCall { format: ToolFormat, tools: Vec<ToolSpec>, lazy: bool },
}

impl Constraint {
    /// The JSON schema the grammar is generated from.
    pub fn schema(&self) -> Value {
        match self {
            Self::JsonObject => json!({"type": "object"}),
            Self::JsonSchema(s) => s.clone(),
            Self::ToolCall { tools, .. } => call_schema(tools),
        }
    }

    /// Literal text around the schema's JSON (the call tags), as grammar literals.
    pub fn around(&self) -> Option<(&'static str, &'static str)> {
        match self {
            Self::ToolCall { format: ToolFormat::Tagged, .. } => Some(("<tool_call>\n", "\n</tool_call>")),
            _ => None,
        }
    }

    /// For a lazy constraint: the text that switches it on, then the literals around the
    /// schema's JSON in what follows that text.
    pub fn lazy_after(&self) -> Option<(&'static str, &'static str, &'static str)> {
        match self {
            Self::ToolCall { lazy: true, format: ToolFormat::Tagged, .. } => {
                Some((CALL_OPEN, "\n", "\n</tool_call>"))
            }
            _ => None,
        }
    }
}

/// The schema of one call: `{"name": one of the tools, "arguments": that tool's parameters}`.
/// References inside a tool's parameters (`#/$defs/…`) are rewritten to where the parameters
/// now sit, since they resolve from the top of the whole document.
pub fn call_schema(tools: &[ToolSpec]) -> Value {
    let one = |t: &ToolSpec, at: &str| {
        let mut parameters = t.parameters.clone();
        rebase_refs(&mut parameters, &format!("{at}/properties/arguments"));
        json!({
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": parameters},
            "required": ["name", "arguments"],
            "additionalProperties": false,
        })
    };
    match tools {
        [t] => one(t, "#"),
        _ => {
            json!({"anyOf": tools.iter().enumerate().map(|(i, t)| one(t, &format!("#/anyOf/{i}"))).collect::<Vec<_>>()})
        }
    }
}

/// Every `"$ref": "#/…"` in `schema` made relative to `base` (`#/…/arguments`).
fn rebase_refs(schema: &mut Value, base: &str) {
    match schema {
        Value::Object(o) => {
            for (k, v) in o.iter_mut() {
                match v {
                    Value::String(r) if k == "$ref" && r.starts_with("#/") => {
                        *r = format!("{base}{}", &r[1..])
                    }
                    v => rebase_refs(v, base),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|v| rebase_refs(v, base)),
        _ => {}
    }
}

/// Schema keywords that only describe (no effect on what is valid).
const ANNOTATIONS: &[&str] = &[
    "$schema",
    "$id",
    "$comment",
    "title",
    "description",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
    "strict",
];

/// Keywords the grammar generator turns into rules.
const SUPPORTED: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "prefixItems",
    "minItems",
    "maxItems",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "$defs",
    "definitions",
    "pattern",
    "format",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
];

/// String formats the grammar generator knows.
const FORMATS: &[&str] = &["date", "time", "date-time", "uuid"];

/// Checks that a JSON schema uses only what the grammar generator turns into rules, so that
/// nothing a schema asks for is silently dropped. The error names the construct and where it is.
pub fn check_schema(schema: &Value) -> Result<(), String> {
    check_at(schema, "#", 0)
}

fn check_at(schema: &Value, at: &str, depth: usize) -> Result<(), String> {
    if depth > 64 {
        return Err(format!("{at}: the schema is nested more than 64 levels deep"));
    }
    let obj = match schema {
        Value::Bool(true) => return Ok(()),
        Value::Object(o) => o,
        _ => return Err(format!("{at}: a schema must be an object (or true)")),
    };
    for (key, value) in obj {
        if ANNOTATIONS.contains(&key.as_str()) {
            continue;
        }
        if !SUPPORTED.contains(&key.as_str()) {
            return Err(format!("{at}: the JSON schema keyword \"{key}\" is not supported"));
        }
        let here = |k: &str| format!("{at}/{k}");
        // The generator takes a `$ref`, `anyOf`, `oneOf` or `allOf` alone and ignores what
        // stands beside it; and a tuple's `prefixItems` alone.
        let alone = |key: &str, allowed: &[&str]| {
            obj.keys()
                .find(|k| *k != key && !ANNOTATIONS.contains(&k.as_str()) && !allowed.contains(&k.as_str()))
                .map(|other| {
                    format!(
                        "{at}: \"{other}\" beside \"{key}\" is not supported; put it inside each alternative"
                    )
                })
        };
        let combined = match key.as_str() {
            "$ref" | "anyOf" | "oneOf" | "allOf" => alone(key, &["$defs", "definitions"]),
            "prefixItems" => alone(key, &["type", "$defs", "definitions"]),
            _ => None,
        };
        if let Some(e) = combined {
            return Err(e);
        }
        match key.as_str() {
            "properties" | "$defs" | "definitions" => {
                let Some(map) = value.as_object() else {
                    return Err(format!("{}: must be an object", here(key)));
                };
                for (name, sub) in map {
                    check_at(sub, &format!("{}/{name}", here(key)), depth + 1)?;
                }
            }
            "items" | "additionalProperties" => match value {
                Value::Bool(_) => {}
                sub => check_at(sub, &here(key), depth + 1)?,
            },
            "prefixItems" | "anyOf" | "oneOf" | "allOf" => {
                let Some(list) = value.as_array() else {
                    return Err(format!("{}: must be an array of schemas", here(key)));
                };
                for (i, sub) in list.iter().enumerate() {
                    check_at(sub, &format!("{}/{i}", here(key)), depth + 1)?;
                }
            }
            "$ref" if !value.as_str().is_some_and(|r| r.starts_with("#/")) => {
                return Err(format!(
                    "{}: only references inside the schema (\"#/…\") are supported",
                    here(key)
                ));
            }
            "pattern" if !value.as_str().is_some_and(|p| p.starts_with('^') && p.ends_with('$')) => {
                return Err(format!("{}: a pattern must be anchored, \"^…$\"", here(key)));
            }
            "format" if !value.as_str().is_some_and(|f| FORMATS.contains(&f)) => {
                return Err(format!(
                    "{}: the string format {value} is not supported (supported: {})",
                    here(key),
                    FORMATS.join(", ")
                ));
            }
            "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum"
                if obj.get("type").and_then(Value::as_str) != Some("integer") =>
            {
                return Err(format!("{}: numeric bounds are supported on integers only", here(key)));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Takes tool calls out of generated text as it streams: content is passed on, except text that
/// may be the start of a call, which is held until it is clearly not one; a call's text is kept
/// and parsed at the end. A call that is not whole, not JSON or names no known tool is handed
/// back as content, never as a call.
#[derive(Debug)]
pub struct ToolCallFilter {
    format: ToolFormat,
    tools: Vec<String>,
    /// Content not yet passed on (a possible start of a call).
    pending: String,
    /// From the first call on, everything.
    calls: Option<String>,
    /// Whether any content went out yet (a JSON-format call must start the answer).
    emitted: bool,
}

impl ToolCallFilter {
    pub fn new(format: ToolFormat, tools: &[ToolSpec]) -> Self {
        Self {
            format,
            tools: tools.iter().map(|t| t.name.clone()).collect(),
            pending: String::new(),
            calls: None,
            emitted: false,
        }
    }

    /// Feeds a piece; returns the content that may be passed on now.
    pub fn push(&mut self, piece: &str) -> String {
        if let Some(calls) = &mut self.calls {
            calls.push_str(piece);
            return String::new();
        }
        self.pending.push_str(piece);
        let out = match self.format {
            ToolFormat::Tagged => {
                if let Some(at) = self.pending.find(CALL_OPEN) {
                    let calls = self.pending.split_off(at);
                    self.calls = Some(calls);
                    std::mem::take(&mut self.pending)
                } else {
                    let hold = held_prefix(&self.pending, CALL_OPEN);
                    let rest = self.pending.split_off(self.pending.len() - hold);
                    std::mem::replace(&mut self.pending, rest)
                }
            }
            ToolFormat::Json => {
                let trimmed = self.pending.trim_start();
                if self.emitted {
                    std::mem::take(&mut self.pending)
                } else if trimmed.is_empty() {
                    String::new()
                } else if trimmed.starts_with('{') {
                    self.calls = Some(std::mem::take(&mut self.pending));
                    String::new()
                } else {
                    std::mem::take(&mut self.pending)
                }
            }
        };
        if !out.is_empty() {
            self.emitted = true;
        }
        out
    }

    /// At the end: the content still held back, and the calls (none when the text held no
    /// whole, valid call: then its text is content).
    pub fn finish(&mut self) -> (String, Vec<ToolCall>) {
        let mut content = std::mem::take(&mut self.pending);
        let Some(text) = self.calls.take() else {
            return (content, Vec::new());
        };
        match parse_calls(self.format, &text, &self.tools) {
            Some((calls, rest)) => {
                content.push_str(&rest);
                (content, calls)
            }
            None => {
                content.push_str(&text);
                (content, Vec::new())
            }
        }
    }
}

/// The calls in `text` and the text around them; None when any call is not whole and valid.
fn parse_calls(format: ToolFormat, text: &str, tools: &[String]) -> Option<(Vec<ToolCall>, String)> {
    let mut calls = Vec::new();
    let mut rest = String::new();
    match format {
        ToolFormat::Tagged => {
            let mut s = text;
            while let Some(open) = s.find(CALL_OPEN) {
                rest.push_str(&s[..open]);
                let after = &s[open + CALL_OPEN.len()..];
                let close = after.find(CALL_CLOSE)?;
                calls.push(parse_call(after[..close].trim(), tools)?);
                s = &after[close + CALL_CLOSE.len()..];
            }
            rest.push_str(s);
        }
        ToolFormat::Json => calls.push(parse_call(text.trim(), tools)?),
    }
    let rest = if rest.trim().is_empty() { String::new() } else { rest.trim().to_string() };
    Some((calls, rest))
}

fn parse_call(text: &str, tools: &[String]) -> Option<ToolCall> {
    let Value::Object(mut call) = serde_json::from_str::<Value>(text).ok()? else {
        return None;
    };
    let name = call.remove("name")?.as_str()?.to_string();
    if !tools.contains(&name) {
        return None;
    }
    let arguments = match call.remove("arguments").or_else(|| call.remove("parameters"))? {
        Value::Object(o) => Value::Object(o).to_string(),
        // Some models write the arguments as a JSON string.
        Value::String(s) => match serde_json::from_str::<Value>(&s).ok()? {
            v @ Value::Object(_) => v.to_string(),
            _ => return None,
        },
        _ => return None,
    };
    Some(ToolCall { id: String::new(), name, arguments })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(name: &str) -> ToolSpec {
        ToolSpec {
            name: name.into(),
            description: None,
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}}),
        }
    }

    fn run(format: ToolFormat, pieces: &[&str]) -> (Vec<String>, String, Vec<ToolCall>) {
        let mut f = ToolCallFilter::new(format, &[tool("weather")]);
        let out = pieces.iter().map(|p| f.push(p)).collect();
        let (rest, calls) = f.finish();
        (out, rest, calls)
    }

    #[test]
    fn content_streams_and_a_tagged_call_split_over_pieces_is_parsed() {
        let (out, rest, calls) = run(
            ToolFormat::Tagged,
            &[
                "Let me check. <to",
                "ol_c",
                "all>\n{\"name\": \"weather\", ",
                "\"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>",
            ],
        );
        assert_eq!(out, ["Let me check. ", "", "", ""]);
        assert_eq!(rest, "");
        assert_eq!(
            calls,
            [ToolCall { id: String::new(), name: "weather".into(), arguments: r#"{"city":"Oslo"}"#.into() }]
        );
    }

    #[test]
    fn text_that_only_looks_like_the_start_of_a_call_is_released() {
        let (out, rest, calls) = run(ToolFormat::Tagged, &["a <to", "y> b"]);
        assert_eq!(out, ["a ", "<toy> b"]);
        assert_eq!((rest.as_str(), calls.len()), ("", 0));
    }

    #[test]
    fn an_unfinished_or_invalid_call_is_content_never_a_call() {
        for pieces in [
            &["<tool_call>\n{\"name\": \"weather\", \"argu"][..],
            &["<tool_call>{\"name\": \"nosuch\", \"arguments\": {}}</tool_call>"],
            &["<tool_call>{\"name\": \"weather\", \"arguments\": 3}</tool_call>"],
        ] {
            let (_, rest, calls) = run(ToolFormat::Tagged, pieces);
            assert!(calls.is_empty(), "{pieces:?}");
            assert_eq!(rest, pieces.concat());
        }
    }

    #[test]
    fn a_json_format_call_is_the_whole_answer() {
        let (out, rest, calls) = run(
            ToolFormat::Json,
            &[" {\"name\": \"weather\",", " \"parameters\": \"{\\\"city\\\": \\\"Rome\\\"}\"}"],
        );
        assert_eq!(out, ["", ""]);
        assert_eq!(rest, "");
        assert_eq!(calls[0].arguments, r#"{"city":"Rome"}"#);
        let (out, _, calls) = run(ToolFormat::Json, &["Sunny", " {\"name\": \"weather\"}"]);
        assert_eq!(out, ["Sunny", " {\"name\": \"weather\"}"]);
        assert!(calls.is_empty());
    }

    #[test]
    fn unsupported_schema_constructs_are_named_with_their_place() {
        assert!(
            check_schema(&json!({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0}}}))
                .is_ok()
        );
        let err = |s: Value| check_schema(&s).unwrap_err();
        assert_eq!(
            err(json!({"type": "object", "properties": {"a": {"not": {"type": "null"}}}})),
            "#/properties/a: the JSON schema keyword \"not\" is not supported"
        );
        assert!(err(json!({"$ref": "https://example.org/s.json"})).contains("references inside the schema"));
        assert!(err(json!({"type": "number", "minimum": 0.5})).contains("integers only"));
        assert!(err(json!({"type": "string", "format": "email"})).contains("\"email\""));
        assert!(err(json!({"anyOf": {"type": "string"}})).contains("array of schemas"));
        assert!(err(json!(3)).contains("must be an object"));
        assert!(err(json!({"type": "string", "pattern": "[a-z]+"})).contains("anchored"));
        assert!(err(json!({"anyOf": [{"type": "string"}], "type": "object"})).contains("beside \"anyOf\""));
        assert!(err(json!({"type": "array", "prefixItems": [true], "maxItems": 2})).contains("beside"));
        // Annotations beside them are fine (what pydantic writes for an optional field).
        assert!(
            check_schema(
                &json!({"anyOf": [{"type": "string"}, {"type": "null"}], "default": null, "title": "A"})
            )
            .is_ok()
        );
    }

    #[test]
    fn one_tool_is_one_object_schema_several_are_any_of() {
        let s = call_schema(&[tool("a")]);
        assert_eq!(s["properties"]["name"]["const"], "a");
        let s = call_schema(&[tool("a"), tool("b")]);
        assert_eq!(s["anyOf"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn references_in_parameters_follow_them_into_the_call_schema() {
        let mut t = tool("a");
        t.parameters = json!({"type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "$defs": {"P": {"type": "string"}}});
        let s = call_schema(&[tool("x"), t]);
        let r = s["anyOf"][1]["properties"]["arguments"]["properties"]["p"]["$ref"].as_str().expect("ref");
        assert_eq!(r, "#/anyOf/1/properties/arguments/$defs/P");
        let pointer = r.trim_start_matches('#');
        assert_eq!(s.pointer(pointer), Some(&json!({"type": "string"})));
    }
}
