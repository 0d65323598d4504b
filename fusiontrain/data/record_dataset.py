"""A map-style dataset of samples built from records on demand: :class:`RecordDataset`."""

from __future__ import annotations

from fusiontrain.data.batch import Sample
from fusiontrain.data.formats import SampleBuilder
from fusiontrain.data.sources import RecordSource


class RecordDataset:
    """Samples built from records on demand (in dataloader workers): ``dataset[i]`` reads record
    ``i``, tokenizes it and decodes its images, or raises BadSample."""

    def __init__(self, records: RecordSource, builder: SampleBuilder) -> None:
        self.records = records
        self.builder = builder

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        return self.builder(self.records[index])

    def size(self, index: int) -> tuple[int, int, int]:
        """Sample ``index``'s text tokens, images and encoder tokens, from its tokens alone when
        every image yields the same token count, else with its images decoded and processed.

        Raises:
            BadSample: naming the record.
        """
        builder = self.builder
        image_format = builder.image_format
        if image_format.tokens_vary:
            sample = builder(self.records[index])
            return len(sample), len(sample.images), sum(image_format.num_tokens(image) for image in sample.images)
        tokenized = builder.tokenize(self.records[index])
        images = len(tokenized.images)
        return len(tokenized.tokens), images, images * image_format.max_tokens_per_image
