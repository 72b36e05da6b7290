//! The join as the consumer runs it: its sides (topic, merged-record field, record shape,
//! required or optional), read from the pipeline file or the built-in CRM ⋈ Inventory one.

use std::sync::Arc;

use pipeline_core::pipeline_config::JoinPlan;
use pipeline_core::record::RecordShape;

/// One side of the join as the consumer uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct SideSpec {
    /// Field of the merged record (`customer`).
    pub name: String,
    pub topic: String,
    pub required: bool,
    /// Fields holding the id and version in this side's records.
    pub shape: RecordShape,
    /// Field of the id's Redis hash holding this side (`s:<name>`).
    pub field: String,
}

/// The sides of the join, in merged-record order.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinSpec {
    pub sides: Vec<SideSpec>,
}

impl JoinSpec {
    pub fn from_plan(p: &JoinPlan) -> Arc<Self> {
        Arc::new(Self {
            sides: p
                .join
                .sides
                .iter()
                .map(|s| SideSpec {
                    name: s.name.clone(),
                    topic: s.topic.clone(),
                    required: s.required,
                    shape: p.shape_of_topic(&s.topic),
                    field: format!("s:{}", s.name),
                })
                .collect(),
        })
    }

    /// A join of required sides named `names`, each fed by `<name>_data` with the default
    /// record shape (the built-in pipeline is `["customer", "inventory"]`).
    #[cfg(test)]
    pub fn of_required(names: &[&str]) -> Self {
        Self {
            sides: names
                .iter()
                .map(|name| SideSpec {
                    name: (*name).to_owned(),
                    topic: format!("{name}_data"),
                    required: true,
                    shape: RecordShape::default(),
                    field: format!("s:{name}"),
                })
                .collect(),
        }
    }

    /// The side fed by `topic`.
    pub fn side_of(&self, topic: &str) -> Option<usize> {
        self.sides.iter().position(|s| s.topic == topic)
    }

    pub fn topics(&self) -> Vec<&str> {
        self.sides.iter().map(|s| s.topic.as_str()).collect()
    }
}
