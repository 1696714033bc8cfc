//! `GET /openapi.json`: the OpenAPI 3.1 document, built from the same route
//! table as the router ([`super::routes`]) and from the types' own schemas.

use axum::Json;
use serde_json::{Map, Value, json};

use super::{Access, Body, Param, Route};

fn content(body: Body, generator: &mut schemars::SchemaGenerator) -> Option<Value> {
    match body {
        Body::None => None,
        Body::Json(schema) => Some(json!({"application/json": {"schema": schema(generator)}})),
        Body::Raw(media) => Some(json!({ media: {"schema": {"type": "string", "format": "binary"}} })),
    }
}

/// The JSON Schema of a path parameter: names as the server takes them,
/// ids as it makes them.
fn path_schema(path: &str, name: &str) -> Value {
    match name {
        "id" if path.starts_with("/v1/users/") => json!({"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"}),
        "id" => json!({"type": "string", "format": "uuid"}),
        "name" => json!({"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}),
        _ => json!({"type": "string", "minLength": 1}),
    }
}

/// The JSON Schema of a query parameter.
fn schema(param: Param) -> Value {
    match param {
        Param::Text => json!({"type": "string", "minLength": 1}),
        Param::Int(min, max) => json!({"type": "integer", "minimum": min, "maximum": max}),
        Param::OneOf(words) => json!({"type": "string", "enum": words}),
        Param::AuditKind => {
            json!({"type": "string", "enum": crate::audit::Kind::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>()})
        }
        Param::UserName => json!({"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"}),
        Param::Time => json!({"type": "string", "format": "date-time"}),
    }
}

/// Bounds of request fields that the policy sets, not the types.
#[derive(Debug, Clone, Copy)]
pub struct PolicyBounds {
    /// `[limits] max_timeout_ms`: any `timeout_ms`.
    pub max_timeout_ms: u64,
    /// The largest tier's `session_idle_s`: a session's `idle_timeout_s`
    /// (a caller's own tier may allow less).
    pub max_session_idle_s: u64,
}

impl PolicyBounds {
    pub fn of(policy: &crate::policy::Policy) -> Self {
        Self {
            max_timeout_ms: u64::try_from(policy.max_wall_time.as_millis()).unwrap_or(u64::MAX),
            max_session_idle_s: policy.tiers.values().map(|t| t.session_idle_s).max().unwrap_or(1),
        }
    }
}

/// The document for `routes`, with the bounds of the server's policy.
pub fn document(routes: &[Route], bounds: PolicyBounds) -> Value {
    let mut generator = schemars::generate::SchemaSettings::openapi3().into_generator();
    let mut paths = Map::new();
    for route in routes {
        // axum's `{*path}` wildcard is a plain parameter in OpenAPI.
        let path = route.path.replace("{*", "{");
        let mut parameters: Vec<Value> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": path_schema(&path, name)}))
            .collect();
        parameters.extend(route.query.iter().map(|(name, description, param)| {
            json!({"name": name, "in": "query", "required": false, "description": description, "schema": schema(*param)})
        }));
        let mut op = json!({
            "summary": route.summary,
            "operationId": format!("{}_{}", route.method, route.path.trim_matches('/').replace(['/', '{', '}', '*', '.'], "_")),
            "parameters": parameters,
            "responses": {
                "200": match content(route.response, &mut generator) {
                    Some(c) => json!({"description": "Success", "content": c}),
                    None => json!({"description": "Success"}),
                },
                "4XX": {"description": "The client's mistake", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            },
        });
        if let Some(c) = content(route.request, &mut generator) {
            op["requestBody"] = json!({"required": false, "content": c});
        }
        match route.access {
            Access::Public => op["security"] = json!([]),
            Access::User => {}
            Access::Admin => op["description"] = json!("Admins only (403 for other users)."),
        }
        let entry = paths.entry(path).or_insert_with(|| json!({}));
        entry[route.method] = op;
    }
    let mut schemas = generator.take_definitions(true);
    let mut request_schemas = Vec::new();
    for op in paths.values_mut().filter_map(Value::as_object_mut).flat_map(|methods| methods.values_mut()) {
        let Some(name) = op
            .pointer("/requestBody/content/application~1json/schema/$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("#/components/schemas/"))
            .map(str::to_owned)
        else {
            continue;
        };
        // A body with fields it cannot go without is required (an empty one is refused).
        let required = schemas.get(&name).and_then(|schema| schema.get("required")).and_then(Value::as_array);
        if required.is_some_and(|required| !required.is_empty()) {
            op["requestBody"]["required"] = Value::Bool(true);
        }
        request_schemas.push(name);
    }
    // Bounds that live in the policy, not in the types: on what requests send
    // (an answer may carry what an earlier policy allowed).
    for name in request_schemas {
        let Some(schema) = schemas.get_mut(&name) else { continue };
        for (field, max) in [("timeout_ms", bounds.max_timeout_ms), ("idle_timeout_s", bounds.max_session_idle_s)] {
            if let Some(field) = schema.pointer_mut(&format!("/properties/{field}")).and_then(Value::as_object_mut) {
                field.insert("maximum".into(), max.into());
            }
        }
    }
    schemas.insert(
        "Error".into(),
        json!({
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
                "code": {"type": "string"}, "message": {"type": "string"}}}}
        }),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "imagentx-sandbox",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Runs AI agents' tool calls in a sandbox. Errors are {\"error\": {\"code\", \"message\"}}.",
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    })
}

pub async fn serve(axum::extract::State(state): axum::extract::State<std::sync::Arc<super::AppState>>) -> Json<Value> {
    Json(document(&super::routes(), PolicyBounds::of(&state.sandbox.policy)))
}
