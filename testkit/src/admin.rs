//! Restate's admin API: registration, health, and the SQL queries the harness reads the
//! server with (`sys_invocation`, `sys_journal`, `state`). Blocking: it is called from test
//! threads and from the crash test's control thread, never from inside a runtime.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::client::SERVICE;

/// One row of `sys_invocation` (the columns the harness looks at; a column that is null or
/// absent is `None`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Invocation {
    pub id: String,
    pub target_service_key: String,
    pub target_handler_name: String,
    /// pending, scheduled, ready, running, paused, backing-off, suspended, completed
    pub status: String,
    pub retry_count: Option<u64>,
    pub last_failure: Option<String>,
    /// `success` or `failure`, once completed.
    pub completion_result: Option<String>,
    /// e.g. `[400] amount must be positive`.
    pub completion_failure: Option<String>,
}

const INVOCATION_COLUMNS: &str = "id, target_service_key, target_handler_name, status, \
     retry_count, last_failure, completion_result, completion_failure";

/// One journal entry of an invocation (`sys_journal` joined with `sys_invocation`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct JournalEntry {
    pub id: String,
    pub target_handler_name: String,
    pub status: String,
    pub completion_result: Option<String>,
    pub index: u64,
    pub entry_type: String,
    pub name: Option<String>,
}

/// A Restate server's (or cluster node's) admin API.
#[derive(Clone)]
pub struct Admin {
    url: String,
    http: reqwest::blocking::Client,
}

impl Admin {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            http: reqwest::blocking::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(30))
                .connect_timeout(Duration::from_secs(2))
                .build()
                .expect("an HTTP client"),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// `GET /health` answers 200 (within 2 s).
    pub fn healthy(&self) -> bool {
        self.http
            .get(format!("{}/health", self.url))
            .timeout(Duration::from_secs(2))
            .send()
            .is_ok_and(|r| r.status().is_success())
    }

    /// `POST /deployments {uri}`, without `force`: one attempt; the deployment's ID. Each build
    /// is registered under a URI of its own (see `Config::deployment_version`): a new URI makes
    /// a new deployment, and invocations already started stay pinned to the deployment they
    /// started on. Restate 1.7 answers a URI it knows with 200 and that deployment's ID,
    /// unchanged even if the endpoint behind the URI now serves other handlers (measured);
    /// `force` would overwrite the deployment in place, under the feet of its in-flight
    /// invocations.
    pub fn register(&self, uri: &str) -> anyhow::Result<String> {
        let url = format!("{}/deployments", self.url);
        let response = self
            .http
            .post(&url)
            .json(&json!({ "uri": uri }))
            .send()
            .with_context(|| format!("POST {url}"))?;
        let status = response.status();
        let body: Value = response.json().unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("registering {uri}: HTTP {status}: {body}");
        }
        Ok(body["id"].as_str().unwrap_or_default().to_owned())
    }

    /// `PATCH /invocations/{id}/cancel`, what `restate invocations cancel` does: the invocation
    /// sees a terminal error at its next await and may still run steps to compensate.
    pub fn cancel(&self, invocation_id: &str) -> anyhow::Result<()> {
        let url = format!("{}/invocations/{invocation_id}/cancel", self.url);
        let response = self
            .http
            .patch(&url)
            .send()
            .with_context(|| format!("PATCH {url}"))?;
        let status = response.status();
        if !status.is_success() {
            bail!(
                "cancelling {invocation_id}: HTTP {status}: {}",
                response.text().unwrap_or_default()
            );
        }
        Ok(())
    }

    /// The registered deployments: ID → URI.
    pub fn deployments(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let url = format!("{}/deployments", self.url);
        let body: Value = self
            .http
            .get(&url)
            .send()
            .with_context(|| format!("GET {url}"))?
            .error_for_status()?
            .json()?;
        Ok(body["deployments"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                let field = |k: &str| d[k].as_str().unwrap_or_default().to_owned();
                (field("id"), field("uri"))
            })
            .collect())
    }

    /// The deployment invocation `id` is pinned to (`None` until it has started on one).
    pub fn pinned_deployment(&self, id: &str) -> anyhow::Result<Option<String>> {
        let rows = self.query(&format!(
            "SELECT pinned_deployment_id FROM sys_invocation WHERE id = {}",
            sql_str(id)
        ))?;
        Ok(rows
            .first()
            .and_then(|r| r["pinned_deployment_id"].as_str())
            .map(str::to_owned))
    }

    /// How many `PaymentService` invocations pinned to deployment `id` have not completed
    /// (0: the deployment is drained and its build may stop).
    pub fn unfinished_on(&self, deployment_id: &str) -> anyhow::Result<u64> {
        let rows = self.query(&format!(
            "SELECT count(*) AS n FROM sys_invocation WHERE target_service_name = '{SERVICE}' \
             AND status != 'completed' AND pinned_deployment_id = {}",
            sql_str(deployment_id)
        ))?;
        Ok(rows.first().and_then(|r| r["n"].as_u64()).unwrap_or(0))
    }

    /// Replaces one payment's whole state with `state` (key, bytes): the admin API applies it
    /// asynchronously, after the invocations in flight.
    pub fn set_state(&self, payment_id: &str, state: &[(&str, &[u8])]) -> anyhow::Result<()> {
        let url = format!("{}/services/{SERVICE}/state", self.url);
        let new_state: serde_json::Map<String, Value> = state
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        self.http
            .post(&url)
            .json(&json!({ "object_key": payment_id, "new_state": new_state }))
            .send()
            .with_context(|| format!("POST {url}"))?
            .error_for_status()
            .with_context(|| format!("POST {url}"))?;
        Ok(())
    }

    /// The OpenAPI document of `PaymentService`.
    pub fn openapi(&self) -> anyhow::Result<Value> {
        let url = format!("{}/services/{SERVICE}/openapi", self.url);
        let response = self.http.get(&url).send()?.error_for_status()?;
        Ok(response.json()?)
    }

    /// Runs SQL on the query API; the rows.
    pub fn query(&self, sql: &str) -> anyhow::Result<Vec<Value>> {
        let url = format!("{}/query", self.url);
        let response = self
            .http
            .post(&url)
            .header("accept", "application/json")
            .json(&json!({ "query": sql }))
            .send()
            .with_context(|| format!("query {sql:?}: POST {url}"))?;
        let status = response.status();
        let text = response.text().unwrap_or_default();
        if !status.is_success() {
            bail!("query {sql:?}: HTTP {status}: {text}");
        }
        let body: Value = serde_json::from_str(&text)
            .with_context(|| format!("query {sql:?}: not JSON: {text}"))?;
        match body.get("rows") {
            Some(Value::Array(rows)) => Ok(rows.clone()),
            _ => bail!("query {sql:?}: no rows: {text}"),
        }
    }

    /// [`Self::query`] with each row parsed as `T`.
    pub fn query_as<T: DeserializeOwned>(&self, sql: &str) -> anyhow::Result<Vec<T>> {
        self.query(sql)?
            .into_iter()
            .map(|row| {
                serde_json::from_value(row.clone())
                    .with_context(|| format!("unexpected row of {sql:?}: {row}"))
            })
            .collect()
    }

    /// `PaymentService` invocations matching the SQL condition `filter`.
    pub fn invocations(&self, filter: &str) -> anyhow::Result<Vec<Invocation>> {
        self.query_as(&format!(
            "SELECT {INVOCATION_COLUMNS} FROM sys_invocation \
             WHERE target_service_name = '{SERVICE}' AND ({filter}) ORDER BY created_at, id"
        ))
    }

    /// Every invocation of one payment.
    pub fn invocations_of(&self, payment_id: &str) -> anyhow::Result<Vec<Invocation>> {
        self.invocations(&format!("target_service_key = {}", sql_str(payment_id)))
    }

    /// `PaymentService` invocations not completed.
    pub fn unfinished(&self) -> anyhow::Result<Vec<Invocation>> {
        self.invocations("status != 'completed'")
    }

    /// How many `PaymentService` invocations the server knows.
    pub fn invocation_count(&self) -> anyhow::Result<u64> {
        let rows = self.query(&format!(
            "SELECT count(*) AS n FROM sys_invocation WHERE target_service_name = '{SERVICE}'"
        ))?;
        Ok(rows.first().and_then(|r| r["n"].as_u64()).unwrap_or(0))
    }

    /// One payment's state: key → value as JSON (text that is not JSON as a JSON string).
    pub fn state(&self, payment_id: &str) -> anyhow::Result<BTreeMap<String, Value>> {
        let rows = self.query(&format!(
            "SELECT key, value_utf8 FROM state WHERE service_name = '{SERVICE}' \
             AND service_key = {}",
            sql_str(payment_id)
        ))?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let key = row["key"].as_str().unwrap_or_default().to_owned();
                (key, json_text(&row["value_utf8"]))
            })
            .collect())
    }

    /// The value of state key `key` of every payment that has one: payment ID → value.
    pub fn state_key<T: DeserializeOwned>(&self, key: &str) -> anyhow::Result<BTreeMap<String, T>> {
        let rows = self.query(&format!(
            "SELECT service_key, value_utf8 FROM state WHERE service_name = '{SERVICE}' \
             AND key = {}",
            sql_str(key)
        ))?;
        rows.into_iter()
            .map(|row| {
                let id = row["service_key"].as_str().unwrap_or_default().to_owned();
                let value = serde_json::from_value(json_text(&row["value_utf8"]))
                    .with_context(|| format!("state {key} of {id}: {row}"))?;
                Ok((id, value))
            })
            .collect()
    }

    /// The journals of one payment's invocations, in order.
    pub fn journal_of(&self, payment_id: &str) -> anyhow::Result<Vec<JournalEntry>> {
        self.query_as(&format!(
            "SELECT i.id, i.target_handler_name, i.status, i.completion_result, j.index, \
             j.entry_type, j.name FROM sys_journal j JOIN sys_invocation i ON j.id = i.id \
             WHERE i.target_service_name = '{SERVICE}' AND i.target_service_key = {} \
             ORDER BY i.created_at, j.id, j.index",
            sql_str(payment_id)
        ))
    }
}

/// A SQL string literal.
pub fn sql_str(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn json_text(value: &Value) -> Value {
    match value.as_str() {
        Some(text) => serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.into())),
        None => Value::Null,
    }
}
