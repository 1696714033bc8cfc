//! `csv-stats`: summary statistics of each column of a CSV table.

use std::collections::BTreeMap;

use imagentx_tool::ToolError;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, JsonSchema)]
struct Input {
    /// The CSV text, with a header row. Give this or `path`.
    csv: Option<String>,
    /// A CSV file in the user's directory, relative to /data. Give this or `csv`.
    path: Option<String>,
    /// The field delimiter (default `,`).
    #[serde(default = "default_delimiter")]
    delimiter: char,
}

fn default_delimiter() -> char {
    ','
}

#[derive(Serialize)]
struct Output {
    rows: usize,
    columns: Vec<Column>,
}

#[derive(Serialize)]
struct Column {
    name: String,
    /// Non-empty cells.
    count: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    numeric: Option<Numeric>,
    /// For text columns: the number of distinct values and the five most common.
    #[serde(skip_serializing_if = "Option::is_none")]
    distinct: Option<usize>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    most_common: Vec<(String, usize)>,
}

#[derive(Serialize)]
struct Numeric {
    min: f64,
    max: f64,
    mean: f64,
    median: f64,
    stddev: f64,
    sum: f64,
}

fn csv_stats(input: Input) -> Result<Output, ToolError> {
    let text = match (input.csv, input.path) {
        (Some(csv), None) => csv,
        (None, Some(path)) => std::fs::read_to_string(format!("/data/{}", path.trim_start_matches('/')))?,
        _ => return Err(ToolError::invalid_input("give exactly one of `csv` and `path`")),
    };
    let delimiter = u8::try_from(input.delimiter)
        .map_err(|_| ToolError::invalid_input("the delimiter must be a single ASCII character"))?;
    let mut reader = csv::ReaderBuilder::new().delimiter(delimiter).from_reader(text.as_bytes());
    let headers: Vec<String> =
        reader.headers().map_err(|e| ToolError::invalid_input(e.to_string()))?.iter().map(str::to_owned).collect();
    let mut cells: Vec<Vec<String>> = vec![Vec::new(); headers.len()];
    let mut rows = 0;
    for record in reader.records() {
        let record = record.map_err(|e| ToolError::invalid_input(format!("bad CSV: {e}")))?;
        rows += 1;
        for (i, cell) in record.iter().enumerate().take(headers.len()) {
            if !cell.trim().is_empty() {
                cells[i].push(cell.trim().to_owned());
            }
        }
    }
    let columns = headers.into_iter().zip(cells).map(|(name, values)| summarise(name, values)).collect();
    Ok(Output { rows, columns })
}

fn summarise(name: String, values: Vec<String>) -> Column {
    let count = values.len();
    let numbers: Option<Vec<f64>> = values.iter().map(|v| v.parse::<f64>().ok()).collect();
    match numbers {
        Some(mut xs) if !xs.is_empty() => {
            xs.sort_by(f64::total_cmp);
            let n = xs.len() as f64;
            let sum: f64 = xs.iter().sum();
            let mean = sum / n;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
            let mid = xs.len() / 2;
            let median = if xs.len() % 2 == 0 { (xs[mid - 1] + xs[mid]) / 2.0 } else { xs[mid] };
            Column {
                name,
                count,
                numeric: Some(Numeric { min: xs[0], max: xs[xs.len() - 1], mean, median, stddev: var.sqrt(), sum }),
                distinct: None,
                most_common: Vec::new(),
            }
        }
        _ => {
            let mut freq: BTreeMap<String, usize> = BTreeMap::new();
            for v in values {
                *freq.entry(v).or_default() += 1;
            }
            let distinct = freq.len();
            let mut most_common: Vec<(String, usize)> = freq.into_iter().collect();
            most_common.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            most_common.truncate(5);
            Column { name, count, numeric: None, distinct: Some(distinct), most_common }
        }
    }
}

imagentx_tool::export_tool!(csv_stats);
