//! What a consumer needs to know of a pipeline: the join's sides and the record shape of every
//! data topic. It never needs to know where the sources are or how they are polled, so the
//! built-in plan is derived from the topic names alone, not from the producer's sources.

use crate::record::RecordShape;
use crate::topics::TopicsConfig;

use super::{builtin, JoinConfig, PipelineConfig};

/// The join and the data topics, as the consumer and DLQ replay use them.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinPlan {
    pub join: JoinConfig,
    /// Every data topic in source order, with the shape of its records.
    topics: Vec<(String, RecordShape)>,
}

impl JoinPlan {
    /// The built-in CRM ⋈ Inventory join over `CUSTOMER_TOPIC` and `INVENTORY_TOPIC`.
    pub fn built_in(topics: &TopicsConfig) -> Self {
        Self {
            join: builtin::join(topics),
            topics: [&topics.customer_topic, &topics.inventory_topic]
                .into_iter()
                .map(|t| (t.clone(), RecordShape::default()))
                .collect(),
        }
    }

    /// Every data topic, each once.
    pub fn data_topics(&self) -> Vec<String> {
        self.topics.iter().map(|(t, _)| t.clone()).collect()
    }

    /// The record shape of `topic` (the default shape for a topic no source feeds).
    pub fn shape_of_topic(&self, topic: &str) -> RecordShape {
        self.topics
            .iter()
            .find(|(t, _)| t == topic)
            .map(|(_, shape)| shape.clone())
            .unwrap_or_default()
    }
}

impl PipelineConfig {
    /// This pipeline's join and data topics.
    pub fn join_plan(&self) -> JoinPlan {
        JoinPlan {
            join: self.join.clone(),
            topics: self
                .data_topics()
                .into_iter()
                .map(|t| {
                    let shape = self.shape_of_topic(&t);
                    (t, shape)
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline_config::TwoSources;

    #[test]
    fn the_built_in_plan_is_the_built_in_pipelines_plan() {
        let topics = TopicsConfig {
            customer_topic: "c".into(),
            inventory_topic: "i".into(),
            ..TopicsConfig::default()
        };
        let from_sources = PipelineConfig::two_sources(&TwoSources::topics_only(&topics));
        assert_eq!(JoinPlan::built_in(&topics), from_sources.join_plan());
        assert_eq!(JoinPlan::built_in(&topics).data_topics(), ["c", "i"]);
    }
}
