//! `docs/reference.md`, generated from the JSON Schemas of the experiment and sweep files (whose
//! descriptions are the doc comments of the types in this module's parent), so that the reference
//! cannot drift from the format: a test fails when the file on disk differs.

use serde_json::Value;

/// The whole reference page.
pub fn markdown() -> String {
    let mut out = String::from(
        "# Reference: the experiment and sweep files\n\n\
         Generated from `schemas/experiment.schema.json` and `schemas/sweep.schema.json` (the doc \
         comments of `src/experiment/`) by `pixel schema --reference`; a test keeps it current. \
         How to use them: [experiments, sweeps, data](experiments.md).\n",
    );
    let experiment = schema(&schemars::schema_for!(super::Experiment));
    out += "\n## The experiment file\n\n";
    out += &table(&experiment, &experiment, "");
    for (key, value) in properties(&experiment) {
        let Some(section) = referenced(&experiment, value) else {
            continue;
        };
        if section.get("properties").is_none() {
            continue;
        }
        section_markdown(&experiment, section, key, &mut out);
    }
    let sweep = schema(&schemars::schema_for!(super::sweep::SweepFile));
    out += "\n## The sweep file\n\n";
    out += &table(&sweep, &sweep, "");
    for (key, value) in properties(&sweep) {
        if let Some(section) = referenced(&sweep, value)
            && section.get("properties").is_some()
        {
            section_markdown(&sweep, section, key, &mut out);
        }
    }
    out
}

fn schema(s: &schemars::Schema) -> Value {
    serde_json::to_value(s).expect("a schema serialises")
}

/// `[key]`'s heading, description and table, then those of the tables inside it.
fn section_markdown(root: &Value, section: &Value, key: &str, out: &mut String) {
    *out += &format!("\n### `[{key}]`\n\n");
    if let Some(d) = section.get("description").and_then(Value::as_str) {
        *out += &format!("{}\n\n", one_line(d));
    }
    *out += &table(root, section, key);
    for (sub, value) in properties(section) {
        if let Some(inner) = referenced(root, value)
            && inner.get("properties").is_some()
        {
            section_markdown(root, inner, &format!("{key}.{sub}"), out);
        }
    }
}

/// The object's keys in order (schemars sorts them by name).
fn properties(object: &Value) -> Vec<(&str, &Value)> {
    object
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| p.iter().map(|(k, v)| (k.as_str(), v)).collect())
        .unwrap_or_default()
}

/// The definition a property points at (`$ref`, or the first `$ref` of an `anyOf` with null).
fn referenced<'a>(root: &'a Value, property: &'a Value) -> Option<&'a Value> {
    let reference = property.get("$ref").or_else(|| {
        property
            .get("anyOf")?
            .as_array()?
            .iter()
            .find_map(|v| v.get("$ref"))
    })?;
    let name = reference.as_str()?.strip_prefix("#/$defs/")?;
    root.get("$defs")?.get(name)
}

/// A table of the keys of `object` that are values, not tables of their own.
fn table(root: &Value, object: &Value, prefix: &str) -> String {
    let mut rows = String::from("| key | value | what it is |\n|---|---|---|\n");
    for (key, property) in properties(object) {
        let target = referenced(root, property);
        if target.is_some_and(|t| t.get("properties").is_some()) {
            continue; // a table: its own section
        }
        let dotted = match prefix {
            "" => key.to_string(),
            p => format!("{p}.{key}"),
        };
        let description = property
            .get("description")
            .or_else(|| target.and_then(|t| t.get("description")))
            .and_then(Value::as_str)
            .map(one_line)
            .unwrap_or_default();
        rows += &format!(
            "| `{dotted}` | {} | {} |\n",
            value_kind(property, target),
            description.replace('|', "\\|")
        );
    }
    rows
}

/// What a key takes: the constants of an enumeration, or the JSON type.
fn value_kind(property: &Value, target: Option<&Value>) -> String {
    if let Some(options) = target.and_then(|t| t.get("oneOf").or_else(|| t.get("enum"))) {
        let names: Vec<String> = options
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o.get("const").or(Some(o)).and_then(Value::as_str))
            .map(|n| format!("`\"{n}\"`"))
            .collect();
        return format!("one of {}", names.join(", "));
    }
    let kind = property
        .get("type")
        .map(|t| match t {
            Value::Array(ts) => ts
                .iter()
                .filter_map(Value::as_str)
                .filter(|t| *t != "null")
                .collect::<Vec<_>>()
                .join(" or "),
            other => other.as_str().unwrap_or("").to_string(),
        })
        .unwrap_or_default();
    match kind.as_str() {
        "array" => {
            let item = property
                .pointer("/items/type")
                .and_then(Value::as_str)
                .unwrap_or("value");
            let count = property.get("minItems").zip(property.get("maxItems"));
            match count {
                Some((a, b)) if a == b => format!("{a} {item}s"),
                _ => format!("list of {item}s"),
            }
        }
        "object" => "table".into(),
        "" => "value".into(),
        k => k.into(),
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
