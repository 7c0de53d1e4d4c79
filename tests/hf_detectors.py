"""Tiny random Hugging Face DETR, Deformable DETR and RT-DETR detectors built offline (ResNet backbone config,
no timm, no download), shared by the detection-map and detection-relevance tests."""


def _resnet(transformers, cls=None, **kw):
    cls = cls or transformers.ResNetConfig
    return cls(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], **kw)


HF_COMMON = {
    "d_model": 32,
    "decoder_layers": 2,
    "decoder_attention_heads": 2,
    "decoder_ffn_dim": 32,
    "num_queries": 5,
    "num_labels": 3,
    "use_pretrained_backbone": False,
}


def hf_detectors(transformers) -> dict:
    """``{"detr", "deformable_detr", "rt_detr"}`` -> a random-initialised model (d_model 32, 2 decoder layers, 5
    queries, 3 labels; deformable ones see 3 levels at strides 8, 16, 32)."""
    detr = transformers.DetrConfig(
        backbone_config=_resnet(transformers, out_features=["stage4"]),
        use_timm_backbone=False,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=32,
        **HF_COMMON,
    )
    ddetr = transformers.DeformableDetrConfig(
        backbone_config=_resnet(transformers, out_features=["stage2", "stage3", "stage4"]),
        use_timm_backbone=False,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=32,
        num_feature_levels=3,
        encoder_n_points=2,
        decoder_n_points=2,
        **HF_COMMON,
    )
    rtdetr = transformers.RTDetrConfig(
        backbone_config=_resnet(
            transformers, transformers.RTDetrResNetConfig, out_features=["stage2", "stage3", "stage4"]
        ),
        encoder_hidden_dim=32,
        encoder_in_channels=[16, 16, 16],
        encoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_in_channels=[32, 32, 32],
        decoder_n_points=2,
        **HF_COMMON,
    )
    return {
        "detr": transformers.DetrForObjectDetection(detr),
        "deformable_detr": transformers.DeformableDetrForObjectDetection(ddetr),
        "rt_detr": transformers.RTDetrForObjectDetection(rtdetr),
    }
