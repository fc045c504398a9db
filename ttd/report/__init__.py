"""What a person looks at: the HTML report over a store (`report`), its charts (`plots`) and one sample's image,
caption, scores and heatmaps (`show`)."""
