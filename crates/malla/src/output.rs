//! Output the way kubectl prints it: `-o table|wide|json|yaml` on every command that prints data,
//! one key style (Kubernetes' camelCase) in JSON and YAML, and tables whose columns grow to fit
//! their longest cell.

use clap::ValueEnum;
use serde::Serialize;

/// `-o`: how a command prints its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Output {
    /// Columns for people (`text` is accepted as another name).
    #[default]
    #[value(alias = "text")]
    Table,
    /// The table with more columns.
    Wide,
    /// JSON, camelCase keys.
    Json,
    /// YAML, the same document as `json`.
    Yaml,
}

impl Output {
    /// Whether the data goes out as a document (JSON or YAML) rather than a table.
    pub fn is_document(self) -> bool {
        matches!(self, Output::Json | Output::Yaml)
    }

    /// Prints `value` as JSON or YAML; `false` for the table formats (the caller prints those).
    pub fn document<T: Serialize + ?Sized>(self, value: &T) -> anyhow::Result<bool> {
        match self {
            Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
            Output::Yaml => print!("{}", serde_yaml::to_string(value)?),
            Output::Table | Output::Wide => return Ok(false),
        }
        Ok(true)
    }
}

/// A table: a header row, then rows; every column as wide as its widest cell, the last column
/// unpadded (kubectl's layout, so long pod names never shift the other columns).
pub struct Table {
    rows: Vec<Vec<String>>,
    /// Columns aligned to the right (numbers).
    right: Vec<usize>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Self {
            rows: vec![headers.iter().map(|h| h.to_string()).collect()],
            right: Vec::new(),
        }
    }

    /// Aligns column `i` (from 0) to the right.
    pub fn right(mut self, i: usize) -> Self {
        self.right.push(i);
        self
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..cols)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for r in &self.rows {
            let mut line = String::new();
            for (c, cell) in r.iter().enumerate() {
                if c > 0 {
                    line.push_str("   ");
                }
                let w = widths[c];
                if self.right.contains(&c) {
                    line.push_str(&format!("{cell:>w$}"));
                } else if c + 1 == r.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<w$}"));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    pub fn print(&self) {
        print!("{}", self.render());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_grow_to_the_longest_cell() {
        let mut t = Table::new(&["NAME", "NODE", "IPS"]).right(1);
        t.row(vec!["a".into(), "n1".into(), "1.2.3.4".into()]);
        t.row(vec![
            "a-very-long-pod-name-indeed".into(),
            "node-12".into(),
            "5.6.7.8".into(),
        ]);
        let s = t.render();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "NAME                             NODE   IPS");
        assert_eq!(lines[1], "a                                  n1   1.2.3.4");
        assert_eq!(lines[2], "a-very-long-pod-name-indeed   node-12   5.6.7.8");
    }
}
