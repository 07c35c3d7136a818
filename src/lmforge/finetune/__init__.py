"""Fine-tuning: supervised fine-tuning and parameter-efficient adapters on the one trainer."""
