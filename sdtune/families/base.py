"""The interface every family module implements (documentation; modules are duck-typed).

    PIPELINE            the diffusers pipeline class (also used for LoRA save/load)
    LORA_TARGETS        default peft target modules of the denoiser
    DENOISER            the denoiser's diffusers model class (UNet2DConditionModel, SD3Transformer2DModel)
    DENOISER_ATTR       "unet" or "transformer": the pipeline attribute holding the denoiser
    COMPILE_BLOCKS      class names that train.compile compiles one by one (regional compilation),
                        or None to compile the whole denoiser
    SIZE_MULTIPLE       image sides (pixels) must be multiples of this; SIZE_WHY says why
    SAMPLERS            `sdtune generate --scheduler` name -> diffusers scheduler class name
    VERSIONS            family name -> the value of VERSION_KEY (a checkpoint file, a key in it)
                        that tells apart the versions one module serves; {} when it serves one
    KOHYA_VERSIONS      family name -> ss_base_model_version, as sd-scripts writes it, for the
                        LoRA's copy in kohya's keys; {} when the family's LoRA gets no such copy

    load_pipeline(model, dtype, **components)   -> pipeline (hub id + revision, or the tiny variant);
                                                   components (e.g. unet=...) replace loaded ones
    load_tokenizer(model)                       -> the tokenizer whose model_max_length limits captions
    load_denoiser(model, dtype, quantization_config=None) -> the denoiser alone
    load_noise_scheduler(model)                 -> the training noise scheduler
    encode_images(pipe, pixels, meta)           -> {name: tensor[B, ...]} to cache (latents, sizes)
    encode_prompts(pipe, captions)              -> {name: tensor[B, ...]} to cache (embeddings)
    check_train(train)                          -> None; a UserError for a train key the family
                                                   cannot honour (before anything loads)
    training_loss(denoiser, scheduler, batch, generator, train) -> loss per sample, shape [B]
    save_lora(directory, state_dict, metadata, adapter_metadata=None)
                                                writes pytorch_lora_weights.safetensors

`model` is `sdtune.params.Model`; `train` is `sdtune.params.Train`; `batch` holds the
cached tensors stacked on dim 0; `generator` is a CPU torch.Generator seeded per step so
noise and timesteps are a function of (seed, step) alone, which is what makes resume exact.
"""
