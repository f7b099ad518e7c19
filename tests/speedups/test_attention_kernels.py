"""cudnn_attention: false keeps scaled_dot_product_attention off cuDNN, on a GPU only."""


def test_cudnn_attention_switch_turns_cudnn_sdpa_off_on_a_gpu_only(monkeypatch):
    import torch

    from docvlm.speedups import attention_kernels as runtime

    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert runtime.disable_cudnn_attention() is False and torch.backends.cuda.cudnn_sdp_enabled()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert runtime.disable_cudnn_attention() is True and not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(enabled)
