//! Generates the client from the committed `openapi/openapi.json` with
//! progenitor. progenitor reads OpenAPI 3.0 while the server publishes 3.1, so
//! the few 3.1-only constructs the server uses are lowered to their 3.0
//! equivalents first; the document itself stays the single source.

use serde_json::{json, Value};

fn lower_to_3_0(v: &mut Value) {
    match v {
        Value::Object(map) => {
            // `type: [T, "null"]` -> `type: T, nullable: true`
            if let Some(Value::Array(types)) = map.get("type").cloned() {
                let non_null: Vec<Value> = types.into_iter().filter(|t| t != "null").collect();
                if let [single] = non_null.as_slice() {
                    map.insert("type".into(), single.clone());
                    map.insert("nullable".into(), json!(true));
                }
            }
            // `oneOf: [{type: null}, S]` -> `allOf: [S], nullable: true`
            if let Some(Value::Array(options)) = map.get("oneOf").cloned() {
                let non_null: Vec<Value> = options
                    .iter()
                    .filter(|o| o.get("type") != Some(&json!("null")))
                    .cloned()
                    .collect();
                if non_null.len() + 1 == options.len() {
                    map.remove("oneOf");
                    map.insert("allOf".into(), Value::Array(non_null));
                    map.insert("nullable".into(), json!(true));
                }
            }
            // numeric `exclusiveMinimum: x` -> `minimum: x, exclusiveMinimum: true`
            if let Some(min) = map
                .get("exclusiveMinimum")
                .filter(|m| m.is_number())
                .cloned()
            {
                map.insert("minimum".into(), min);
                map.insert("exclusiveMinimum".into(), json!(true));
            }
            // A response with several media types: keep JSON (the event stream is not modelled).
            if let Some(Value::Object(content)) = map.get_mut("content") {
                if content.contains_key("application/json") && content.len() > 1 {
                    content.retain(|k, _| k == "application/json");
                }
            }
            for child in map.values_mut() {
                lower_to_3_0(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(lower_to_3_0),
        _ => {}
    }
}

fn main() {
    let path = "../openapi/openapi.json";
    println!("cargo:rerun-if-changed={path}");
    let text = std::fs::read_to_string(path).expect("reading openapi/openapi.json");
    let mut doc: Value = serde_json::from_str(&text).expect("openapi.json is JSON");
    doc["openapi"] = json!("3.0.3");
    lower_to_3_0(&mut doc);
    let spec: openapiv3::OpenAPI =
        serde_json::from_value(doc).expect("a valid OpenAPI 3.0 document");
    let mut generator = progenitor::Generator::default();
    let tokens = generator
        .generate_tokens(&spec)
        .expect("progenitor generates the client");
    let ast = syn::parse2(tokens).expect("generated code parses");
    let out = std::path::Path::new(&std::env::var("OUT_DIR").unwrap()).join("codegen.rs");
    std::fs::write(out, prettyplease::unparse(&ast)).expect("writing the generated client");
}
