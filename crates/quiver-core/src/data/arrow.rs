//! Rows of an Arrow IPC stream file (the `data-*.arrow` files a Hugging
//! Face `datasets.save_to_disk` writes) as JSON objects, read with the
//! Apache Arrow project's `arrow-ipc` reader.
//!
//! Every column becomes a field of each row's object: strings as strings,
//! integers and floats as numbers, booleans as booleans, lists (a Hugging
//! Face `Sequence`) as arrays, structs as objects and nulls as `null`.
//! A column of another type (dates, binary, ...) is refused with its name,
//! so a dataset that needs it fails loudly rather than with a missing field.

use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type,
    UInt64Type, UInt8Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Every row of the Arrow IPC stream at `path`, in order.
pub fn read_rows(path: &Path) -> Result<Vec<Map<String, Value>>> {
    let bad = |msg: String| Error::Data {
        path: path.to_path_buf(),
        msg,
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = arrow_ipc::reader::StreamReader::try_new(std::io::BufReader::new(file), None)
        .map_err(|e| bad(format!("not an Arrow IPC stream: {e}")))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| bad(format!("unreadable record batch: {e}")))?;
        batch_rows(&batch, &mut rows).map_err(bad)?;
    }
    Ok(rows)
}

fn batch_rows(
    batch: &RecordBatch,
    rows: &mut Vec<Map<String, Value>>,
) -> std::result::Result<(), String> {
    let schema = batch.schema();
    let start = rows.len();
    rows.extend((0..batch.num_rows()).map(|_| Map::new()));
    for (field, col) in schema.fields().iter().zip(batch.columns()) {
        for (i, row) in rows[start..].iter_mut().enumerate() {
            let v =
                value(col.as_ref(), i).map_err(|e| format!("column `{}`: {e}", field.name()))?;
            row.insert(field.name().clone(), v);
        }
    }
    Ok(())
}

/// Element `i` of `array` as JSON.
fn value(array: &dyn Array, i: usize) -> std::result::Result<Value, String> {
    if array.is_null(i) {
        return Ok(Value::Null);
    }
    macro_rules! prim {
        ($t:ty) => {
            Value::from(array.as_primitive::<$t>().value(i))
        };
    }
    Ok(match array.data_type() {
        DataType::Null => Value::Null,
        DataType::Boolean => Value::Bool(array.as_boolean().value(i)),
        DataType::Utf8 => Value::String(array.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Value::String(array.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Value::String(array.as_string_view().value(i).to_string()),
        DataType::Int8 => prim!(Int8Type),
        DataType::Int16 => prim!(Int16Type),
        DataType::Int32 => prim!(Int32Type),
        DataType::Int64 => prim!(Int64Type),
        DataType::UInt8 => prim!(UInt8Type),
        DataType::UInt16 => prim!(UInt16Type),
        DataType::UInt32 => prim!(UInt32Type),
        DataType::UInt64 => prim!(UInt64Type),
        DataType::Float32 => Value::from(f64::from(array.as_primitive::<Float32Type>().value(i))),
        DataType::Float64 => Value::from(array.as_primitive::<Float64Type>().value(i)),
        DataType::List(_) => list(array.as_list::<i32>().value(i).as_ref())?,
        DataType::LargeList(_) => list(array.as_list::<i64>().value(i).as_ref())?,
        DataType::FixedSizeList(_, _) => list(array.as_fixed_size_list().value(i).as_ref())?,
        DataType::Struct(_) => {
            let s = array.as_struct();
            let mut obj = Map::new();
            for (name, col) in s.column_names().into_iter().zip(s.columns()) {
                obj.insert(name.to_string(), value(col.as_ref(), i)?);
            }
            Value::Object(obj)
        }
        other => return Err(format!("unsupported Arrow type {other}")),
    })
}

fn list(values: &dyn Array) -> std::result::Result<Value, String> {
    (0..values.len())
        .map(|j| value(values, j))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(Value::Array)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::builder::{ListBuilder, StringBuilder};
    use arrow_array::{ArrayRef, BooleanArray, Int64Array, StringArray, StructArray};
    use arrow_schema::{Field, Schema};
    use serde_json::json;
    use std::sync::Arc;

    /// Writes a two-batch stream with strings, nulls, integers, booleans,
    /// a list of strings and a struct of a list (Hugging Face's
    /// `Sequence({"text": ..., "label": ...})`), and reads it back.
    #[test]
    fn reads_every_column_type_a_hf_dataset_uses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data-00000-of-00001.arrow");
        let batch = |offset: i64| -> RecordBatch {
            let q: ArrayRef = Arc::new(StringArray::from(vec![Some("Q1"), None]));
            let label: ArrayRef = Arc::new(Int64Array::from(vec![offset, offset + 1]));
            let flag: ArrayRef = Arc::new(BooleanArray::from(vec![true, false]));
            let mut lb = ListBuilder::new(StringBuilder::new());
            lb.values().append_value("a");
            lb.values().append_value("b");
            lb.append(true);
            lb.append(true);
            let choices: ArrayRef = Arc::new(lb.finish());
            let mut tb = ListBuilder::new(StringBuilder::new());
            tb.values().append_value("x");
            tb.append(true);
            tb.values().append_value("y");
            tb.values().append_value("z");
            tb.append(true);
            let text: ArrayRef = Arc::new(tb.finish());
            let st: ArrayRef = Arc::new(StructArray::from(vec![(
                Arc::new(Field::new("text", text.data_type().clone(), true)),
                text,
            )]));
            let schema = Schema::new(vec![
                Field::new("question", DataType::Utf8, true),
                Field::new("label", DataType::Int64, false),
                Field::new("flag", DataType::Boolean, false),
                Field::new("choices", choices.data_type().clone(), true),
                Field::new("nested", st.data_type().clone(), true),
            ]);
            RecordBatch::try_new(Arc::new(schema), vec![q, label, flag, choices, st]).unwrap()
        };
        let (b0, b1) = (batch(0), batch(10));
        let f = std::fs::File::create(&path).unwrap();
        let mut w = arrow_ipc::writer::StreamWriter::try_new(f, &b0.schema()).unwrap();
        w.write(&b0).unwrap();
        w.write(&b1).unwrap();
        w.finish().unwrap();
        let rows = read_rows(&path).unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(
            Value::Object(rows[0].clone()),
            json!({"question": "Q1", "label": 0, "flag": true, "choices": ["a", "b"], "nested": {"text": ["x"]}})
        );
        assert_eq!(
            Value::Object(rows[3].clone()),
            json!({"question": null, "label": 11, "flag": false, "choices": [], "nested": {"text": ["y", "z"]}})
        );
    }

    #[test]
    fn a_file_that_is_not_arrow_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.arrow");
        std::fs::write(&path, b"not arrow at all").unwrap();
        let err = read_rows(&path).unwrap_err().to_string();
        assert!(
            err.contains("data.arrow") && err.contains("Arrow IPC"),
            "{err}"
        );
    }
}
